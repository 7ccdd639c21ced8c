"""Training objectives by method name: `get_method(name)(model, batch, prior, config) -> dict[str, Tensor]`.

Each returns a dict of scalar loss terms with the key "total" (what is back-propagated) and its parts
("ce", "visual", "text", ...) for logging. Modules are imported lazily: a method's dependencies load only
when it is used.

The same explanation terms as plain functions of a `megl.GradCAM` output, for a loop of your own:
`gradia`, `haics`, `res_g`, `res_l`, `rrr` and MEGL's `visual` (megl/losses/functional.py). Importing them here
loads the gradia / haics / res / rrr modules first, so the names below are the functions, not those modules
(`from megl.losses.gradia import ...` still reaches the modules).
"""
from __future__ import annotations

import importlib
from typing import Callable

METHODS: dict[str, str] = {
    "baseline": "megl.losses.megl:baseline_loss",
    "megl": "megl.losses.megl:megl_loss",
    "gradia": "megl.losses.gradia:gradia_loss",
    "haics": "megl.losses.haics:haics_loss",
    "res-g": "megl.losses.res:res_g_loss",
    "res-l": "megl.losses.res:res_l_loss",
    "rrr": "megl.losses.rrr:rrr_loss",
    "cdep": "megl.losses.cdep:cdep_loss",
}


def get_method(name: str) -> Callable:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    module, fn = METHODS[name].split(":")
    return getattr(importlib.import_module(module), fn)


from .functional import ResImputation, gradia, haics, res_g, res_l, rrr, visual  # noqa: E402

__all__ = ["METHODS", "ResImputation", "get_method", "gradia", "haics", "res_g", "res_l", "rrr", "visual"]

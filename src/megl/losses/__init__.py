"""Training objectives: `get_method(name)(model, batch, prior, config) -> dict[str, Tensor]` (the registry of
megl/methods.py names each method's objective here and its model).

Each returns a dict of scalar loss terms with the key "total" (what is back-propagated) and its parts
("ce", "visual", "text", ...) for logging. Modules are imported lazily: a method's dependencies load only
when it is used.

The same explanation terms as plain functions of a `megl.GradCAM` output, for a loop of your own:
`gradia`, `haics`, `res_g`, `res_l`, `rrr`, MEGL's `visual` (megl/losses/functional.py) and `background`
(megl/losses/megl.py: `background(model, images, masks, has_mask)`). Importing them here
loads the gradia / haics / res / rrr modules first, so the names below are the functions, not those modules
(`from megl.losses.gradia import ...` still reaches the modules).
"""
from __future__ import annotations

from megl.methods import get_method, list_methods  # the registry (megl/methods.py); kept here for old callers

from .functional import ResImputation, gradia, haics, res_g, res_l, rrr, visual  # noqa: E402
from .megl import background_loss as background  # noqa: E402

__all__ = ["ResImputation", "background", "get_method", "list_methods", "gradia", "haics", "res_g", "res_l", "rrr", "visual"]

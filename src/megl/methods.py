"""The method registry: every training method by name, with its objective and the model it trains.

    get_method("res-l")(model, batch, prior, config) -> dict of loss terms ("total" is back-propagated)
    get_method("llava").resolve("build_model")(config, class_names, tokenizer, device=..., standins=...)
    list_methods(kind="llm") -> ["ft-cot", "llava"]

A `Method` names its parts as "module:attribute" strings, imported on first use, so that importing megl (or
validating a config) loads no model code. `kind`: "visual" methods train a MEGLModel (a classifier with Grad-CAM,
scored with mIoU); "llm" methods train an LLM classifier that answers in text (models/llm_classifier.py).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

Ref = Union[str, Callable]  # "module:attribute", or the object itself
KINDS = ("visual", "llm")


@dataclass(frozen=True)
class Method:
    name: str
    loss: Ref  # (model, batch, prior, config) -> dict[str, Tensor]
    build_model: Ref  # (config, class_names, tokenizer=None, device="cpu", standins=None) -> nn.Module
    setup: Optional[Ref] = None  # (model, config): adds modules the method trains; the model builder calls it
    kind: str = "visual"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Method {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")

    def resolve(self, part: str) -> Optional[Callable]:
        """The callable behind `loss`, `build_model` or `setup` (None for a method without setup)."""
        ref = getattr(self, part)
        if ref is None or callable(ref):
            return ref
        module, _, attr = ref.partition(":")
        return getattr(importlib.import_module(module), attr)

    def __call__(self, model, batch, prior=None, config=None) -> dict[str, Any]:
        return self.resolve("loss")(model, batch, prior, config)


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"method {method.name!r} is already registered; pass replace=True to override it")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(list_methods())}")
    return _REGISTRY[name]


def list_methods(kind: Optional[str] = None) -> list[str]:
    return sorted(n for n, m in _REGISTRY.items() if kind is None or m.kind == kind)


_MEGL_MODEL = "megl.models.megl:build_model"
_LLM_MODEL = "megl.models.llm_classifier:build_llm_classifier"  # its mode defaults to config.method
for _name, _loss in [("baseline", "megl.losses.megl:baseline_loss"), ("megl", "megl.losses.megl:megl_loss"),
                     ("gradia", "megl.losses.gradia:gradia_loss"), ("haics", "megl.losses.haics:haics_loss"),
                     ("res-g", "megl.losses.res:res_g_loss"), ("rrr", "megl.losses.rrr:rrr_loss"),
                     ("cdep", "megl.losses.cdep:cdep_loss")]:
    register_method(Method(_name, _loss, _MEGL_MODEL))
register_method(Method("res-l", "megl.losses.res:res_l_loss", _MEGL_MODEL, setup="megl.losses.res:setup_res_l"))
register_method(Method("llava", "megl.models.llm_classifier:llava_loss", _LLM_MODEL, kind="llm"))
register_method(Method("ft-cot", "megl.models.llm_classifier:ft_cot_loss", _LLM_MODEL, kind="llm"))

__all__ = ["Method", "get_method", "list_methods", "register_method"]

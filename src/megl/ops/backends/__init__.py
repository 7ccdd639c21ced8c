"""Backend registry: each backend is a module with `available()`, `forward(...)` and `backward(...)`.

See `torch_explicit.py` for the contract. Modules are imported lazily so that a missing build of one
backend never breaks the others. `triton_kernels.py` holds the Triton kernels behind `triton.py` (not a backend).
"""
from __future__ import annotations

import importlib
import json
import os
from types import ModuleType

# name -> (module, how to build it when missing)
_BACKENDS = {
    "torch": ("megl.ops.backends.torch_explicit", "nothing to build: it is plain PyTorch"),
    "cpp": ("megl.ops.backends.cpp", "pip install . (needs a C++ compiler; the pybind11 module megl._saliency_cpu)"),
    "cuda": (
        "megl.ops.backends.cuda",
        "reinstall where a CUDA toolkit and a GPU (or TORCH_CUDA_ARCH_LIST) are found: pip install -v . says why "
        "megl._saliency_cuda was skipped (MEGL_REQUIRE_CUDA=1 makes a skip an error); then run on a CUDA device",
    ),
    "triton": (
        "megl.ops.backends.triton",
        "pip install triton (bundled with Linux CUDA builds of torch); on CPU set TRITON_INTERPRET=1 before importing megl",
    ),
}
NAMES = ("reference",) + tuple(_BACKENDS)


class BackendUnavailable(RuntimeError):
    pass


def build_skip_reason() -> str | None:
    """Why the install skipped the CUDA module, as setup.py recorded it in megl/_build_info.json (None: not skipped
    or not recorded)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f).get("cuda_skipped")
    except (OSError, ValueError, AttributeError):
        return None


def import_extension(name: str) -> tuple[ModuleType | None, str | None]:
    """The compiled module `megl.<name>` and None, or None and why it cannot be used (not built, or stale)."""
    try:
        ext = importlib.import_module(f"megl.{name}")
    except ImportError as err:
        skipped = build_skip_reason() if name == "_saliency_cuda" else None
        if skipped:
            return None, f"the install built no megl.{name}: {skipped}"
        return None, f"the extension megl.{name} could not be imported: {err}"
    if not hasattr(ext, "forward"):
        return None, f"the extension {ext.__file__} is a stale build without the kernels; rebuild it"
    return ext, None


def load(name: str) -> ModuleType:
    """The backend module `name`, or a BackendUnavailable error that says how to build it."""
    if name not in _BACKENDS:  # 'reference' is autograd through megl.ops.reference, not a contract module
        hint = "; 'reference' has no module: use fused_saliency(..., backend='reference')" if name == "reference" else ""
        raise ValueError(f"unknown megl backend module {name!r}; choose one of {', '.join(_BACKENDS)}{hint}")
    module_name, how = _BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
        reason = None if module.available() else getattr(module, "UNAVAILABLE_REASON", "not available")
    except ImportError as err:  # the compiled extension or triton is missing
        reason = str(err)
    if reason is not None:
        raise BackendUnavailable(f"megl backend {name!r} is not available ({reason}). To get it: {how}.")
    return module


def is_available(name: str) -> bool:
    if name == "reference":
        return True
    try:
        load(name)
        return True
    except BackendUnavailable:
        return False


def available_backends() -> list[str]:
    return [n for n in NAMES if is_available(n)]

"""megl: Multimodal Explanation-Guided Learning, with fused explanation kernels."""
__version__ = "0.1.0"


_LAZY = {"GradCAM": "megl.gradcam", "GradCAMOutput": "megl.gradcam"}


def __getattr__(name):  # `import megl` stays light: torch loads with the first use of megl.GradCAM
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ("losses", "ops", "models", "data", "metrics"):
        return importlib.import_module(f"megl.{name}")
    raise AttributeError(f"module 'megl' has no attribute {name!r}")

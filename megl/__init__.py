"""megl: Multimodal Explanation-Guided Learning, with fused explanation kernels."""
__version__ = "0.1.0"

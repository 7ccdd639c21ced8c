import os

# Triton runs on the CPU only in interpreter mode, which must be on before any kernel is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The pretrained stand-ins' shared cache (megl.models.standins): a fresh one per test session, never ~/.cache.
if "MEGL_CACHE" not in os.environ:
    import tempfile

    os.environ["MEGL_CACHE"] = tempfile.mkdtemp(prefix="megl-test-cache-")

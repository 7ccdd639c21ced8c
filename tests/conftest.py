import os

# Triton runs on the CPU only in interpreter mode, which must be on before any kernel is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The pretrained stand-ins' shared cache (megl.models.standins): a fresh one per test session, never ~/.cache.
if "MEGL_CACHE" not in os.environ:
    import tempfile

    os.environ["MEGL_CACHE"] = tempfile.mkdtemp(prefix="megl-test-cache-")


import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """The CPU is shared: tiny problems run fastest single-threaded (restores torch's thread count after)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

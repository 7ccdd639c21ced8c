"""How the build finds the CUDA toolkit and picks architectures (cuda_build.py), without running nvcc."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("cuda_build", ROOT / "cuda_build.py")
cuda_build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cuda_build)


def toolkit(path: Path, runtime: bool = True) -> Path:
    """A fake toolkit: bin/nvcc (a large-enough file, like the real binary) and, optionally, the static runtime."""
    (path / "bin").mkdir(parents=True)
    (path / "bin" / "nvcc").write_bytes(b"\x7fELF" + b"\0" * (70 * 1024))
    (path / "bin" / "nvcc").chmod(0o755)
    (path / "lib64").mkdir()
    if runtime:
        (path / "lib64" / "libcudart_static.a").write_bytes(b"!<arch>\n")
    return path


def no_nvcc(_):
    return None


@pytest.fixture(autouse=True)
def no_default_root(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda_build, "DEFAULT_ROOT", str(tmp_path / "no-default-cuda"))


def test_cuda_home_wins(tmp_path):
    root = toolkit(tmp_path / "cuda-12.4")
    nvcc, found, lib = cuda_build.find_cuda({"CUDA_HOME": str(root)}, which=no_nvcc)
    assert (nvcc, found, lib) == (str(root / "bin" / "nvcc"), str(root), str(root / "lib64"))


def test_cuda_path_is_read_too(tmp_path):
    root = toolkit(tmp_path / "cuda")
    assert cuda_build.find_cuda({"CUDA_PATH": str(root)}, which=no_nvcc)[1] == str(root)


def test_wrong_cuda_home_is_reported_not_replaced(tmp_path):
    toolkit(tmp_path / "good")
    with pytest.raises(cuda_build.CudaSkipped, match=r"CUDA_HOME=.*no bin/nvcc.*MEGL_SKIP_CUDA"):
        cuda_build.find_cuda({"CUDA_HOME": str(tmp_path / "nowhere")},
                             which=lambda _: str(tmp_path / "good" / "bin" / "nvcc"))


def test_wrapper_script_on_path_leads_to_the_real_toolkit(tmp_path):
    """The failure of the README's first line: /usr/local/bin/nvcc execs the toolkit's nvcc, and the folder above
    the wrapper has no lib64/libcudart_static.a."""
    real = toolkit(tmp_path / "cuda-13.0")
    wrapper = tmp_path / "usr" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    nvcc, root, lib = cuda_build.find_cuda({}, which=lambda _: str(wrapper))
    assert root == str(real) and lib == str(real / "lib64") and nvcc == str(real / "bin" / "nvcc")


def test_symlink_on_path_is_followed(tmp_path):
    real = toolkit(tmp_path / "opt" / "cuda")
    link = tmp_path / "bin" / "nvcc"
    link.parent.mkdir()
    link.symlink_to(real / "bin" / "nvcc")
    assert cuda_build.find_cuda({}, which=lambda _: str(link))[1] == str(real)


def test_missing_runtime_library_is_named(tmp_path):
    root = toolkit(tmp_path / "cuda", runtime=False)
    with pytest.raises(cuda_build.CudaSkipped, match="no lib64/libcudart_static.a"):
        cuda_build.find_cuda({}, which=lambda _: str(root / "bin" / "nvcc"))
    with pytest.raises(cuda_build.CudaSkipped, match="CUDA_HOME=.*no lib64/libcudart_static.a"):
        cuda_build.find_cuda({"CUDA_HOME": str(root)}, which=no_nvcc)


def test_default_location_is_the_last_resort(tmp_path, monkeypatch):
    root = toolkit(tmp_path / "usr-local-cuda")
    monkeypatch.setattr(cuda_build, "DEFAULT_ROOT", str(root))
    assert cuda_build.find_cuda({}, which=no_nvcc)[1] == str(root)


def test_nothing_found_says_so(tmp_path):
    with pytest.raises(cuda_build.CudaSkipped, match="no nvcc on PATH"):
        cuda_build.find_cuda({}, which=no_nvcc)


def test_skip_flag(tmp_path):
    root = toolkit(tmp_path / "cuda")
    with pytest.raises(cuda_build.CudaSkipped, match="MEGL_SKIP_CUDA"):
        cuda_build.find_cuda({"MEGL_SKIP_CUDA": "1", "CUDA_HOME": str(root)}, which=no_nvcc)
    assert cuda_build.find_cuda({"MEGL_SKIP_CUDA": "0", "CUDA_HOME": str(root)}, which=no_nvcc)[1] == str(root)


def test_arch_policy():
    assert cuda_build.cuda_archs({"TORCH_CUDA_ARCH_LIST": "8.0;9.0+PTX"}, gpus=lambda: ["8.6"]) == ["8.0", "9.0+PTX"]
    assert cuda_build.cuda_archs({}, gpus=lambda: ["8.0", "9.0"]) == ["8.0", "9.0+PTX"]
    with pytest.raises(cuda_build.CudaSkipped, match="no GPU visible.*TORCH_CUDA_ARCH_LIST"):
        cuda_build.cuda_archs({}, gpus=lambda: [])
    with pytest.raises(cuda_build.CudaSkipped, match="cannot read sm90"):
        cuda_build.cuda_archs({"TORCH_CUDA_ARCH_LIST": "sm90"}, gpus=lambda: [])
    assert cuda_build.gencode_flags(["8.6", "9.0+PTX"]) == [
        "-gencode", "arch=compute_86,code=sm_86", "-gencode", "arch=compute_90,code=sm_90",
        "-gencode", "arch=compute_90,code=compute_90"]


def test_visible_gpus_parses_nvidia_smi():
    class Done:
        returncode, stdout = 0, "9.0\n8.6\n9.0\n"

    assert cuda_build.visible_gpu_archs(run=lambda *a, **k: Done()) == ["8.6", "9.0"]

    def missing(*a, **k):
        raise FileNotFoundError("nvidia-smi")

    assert cuda_build.visible_gpu_archs(run=missing) == []


def run_setup(tmp_path, **env):
    environ = {k: v for k, v in os.environ.items()  # CI exports MEGL_REQUIRE_CUDA=1: each test sets its own
               if k not in ("CUDA_HOME", "CUDA_PATH", "TORCH_CUDA_ARCH_LIST", "MEGL_REQUIRE_CUDA", "MEGL_SKIP_CUDA")}
    environ.update(env)
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "tmp"),
                           "--build-lib", str(tmp_path / "lib")], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=600)


def broken_toolkit(tmp_path) -> Path:
    root = toolkit(tmp_path / "broken-cuda")
    (root / "bin" / "nvcc").write_text("#!/bin/sh\necho 'nvcc: broken on purpose' >&2\nexit 1\n" + "#" * 70000)
    return root


def test_required_cuda_fails_the_build_before_compiling(tmp_path):
    res = run_setup(tmp_path, CUDA_HOME=str(tmp_path / "nowhere"), MEGL_REQUIRE_CUDA="1")
    assert res.returncode != 0
    assert "MEGL_REQUIRE_CUDA=1 but the CUDA module cannot be built: CUDA_HOME=" in res.stderr
    assert not (tmp_path / "lib").exists()  # failed up front, nothing compiled


@pytest.mark.slow
def test_broken_nvcc_still_builds_the_cpu_module(tmp_path):
    root = broken_toolkit(tmp_path)
    res = run_setup(tmp_path, CUDA_HOME=str(root), TORCH_CUDA_ARCH_LIST="9.0")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "megl: building without the CUDA backend: CalledProcessError" in res.stderr
    built = sorted(p.name.split(".")[0] for p in (tmp_path / "lib" / "megl").glob("*.so"))
    assert built == ["_saliency_cpu"]
    info = json.loads((tmp_path / "lib" / "megl" / "_build_info.json").read_text())
    assert info["cuda_skipped"].startswith("CalledProcessError")  # what the cuda backend's error will repeat
    res = run_setup(tmp_path / "again", CUDA_HOME=str(root), TORCH_CUDA_ARCH_LIST="9.0", MEGL_REQUIRE_CUDA="1")
    assert res.returncode != 0 and "MEGL_REQUIRE_CUDA=1" in res.stderr

"""Run directories: a resume never restarts silently, nothing is overwritten without --force, crash leftovers are
cleaned, the checkpoint and last.json change together, and predict never overwrites its own overlays."""
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megl import runs
from megl.train import Dist, main, train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import TINY_SETS, tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    train(tiny_config(max_new_tokens=3), out, Dist("cpu"), progress=False)
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    dst = tmp_path / "r"
    shutil.copytree(finished_run, dst, symlinks=True)
    return dst


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_resume_without_its_checkpoint_file_refuses(run_copy):
    (run_copy / runs.CHECKPOINT).unlink()  # last.json stays
    before = _snapshot(run_copy)
    with pytest.raises(SystemExit, match=r"^megl.train: error: .*last.safetensors is missing") as e:
        main(["--resume", str(run_copy), "--epochs", "2", "--no-progress"])
    assert "\n" not in str(e.value)
    assert _snapshot(run_copy) == before


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupt_checkpoint_is_named_and_nothing_is_written(run_copy, damage):
    path = run_copy / runs.CHECKPOINT
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x08" + data[1:200])
    before = _snapshot(run_copy)
    with pytest.raises(SystemExit, match=f"^megl.train: error: checkpoint {path} is truncated or corrupt"):
        main(["--resume", str(run_copy), "--epochs", "2", "--no-progress"])
    assert _snapshot(run_copy) == before
    with pytest.raises(runs.RunError, match="truncated or corrupt"):
        runs.load_run(run_copy)


def test_out_must_be_empty_unless_forced(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("megl.train.train", lambda config, run_dir, d, **kw: calls.append(run_dir))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text("my own file")
    (out / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit, match=r"--out .*mine is not empty \(config.json, notes.txt\).*--force"):
        main(["--out", str(out), "--no-progress"])
    assert (out / "config.json").read_text() == "my own file" and calls == []
    assert main(["--out", str(out), "--no-progress", "--force"]) == 0 and calls == [out]
    (tmp_path / "empty").mkdir()
    assert main(["--out", str(tmp_path / "empty"), "--no-progress"]) == 0


def test_stale_temp_files_are_removed_at_start(run_copy):
    ck = run_copy / "checkpoints"
    stale = [ck / ".last.safetensors.abc123.tmp", run_copy / ".metrics.json.x1.tmp",
             run_copy / ".checkpoints.dead", run_copy / ".staging-tokenizer.zz"]
    for p in stale:
        if p.suffix == ".tmp":
            p.write_bytes(b"\0" * 1000)
        else:
            p.mkdir()
            (p / "last.safetensors").write_bytes(b"\0")
    metrics = (run_copy / "metrics.json").read_text()
    assert main(["--resume", str(run_copy), "--no-progress"]) == 0  # already finished: nothing to train
    assert not any(p.exists() for p in stale)
    assert (run_copy / "metrics.json").read_text() == metrics and runs.load_checkpoint(run_copy) is not None


def test_checkpoint_and_last_json_change_together(tmp_path, monkeypatch):
    model = {"w": torch.zeros(3)}
    runs.save_checkpoint(tmp_path, model, {"state": {}, "param_groups": []}, {}, {"global_step": 1})

    def fail(path, obj):  # killed between the two files
        raise KeyboardInterrupt

    monkeypatch.setattr("megl.runs.write_json", fail)
    with pytest.raises(KeyboardInterrupt):
        runs.save_checkpoint(tmp_path, {"w": torch.ones(3)}, {"state": {}, "param_groups": []}, {}, {"global_step": 2})
    state = json.loads((tmp_path / "checkpoints" / "last.json").read_text())
    weights, _, _, ckpt_state = runs.load_checkpoint(tmp_path)
    assert state == ckpt_state == {"global_step": 1} and torch.equal(weights["w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [os.readlink(tmp_path / "checkpoints")]


def test_atomic_writes_sync_the_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.path.isdir(f"/proc/self/fd/{fd}")), real(fd)))
    runs.write_json(tmp_path / "x.json", {"a": 1})
    assert synced == [False, True]  # the file, then the directory holding the rename


def test_device_without_cuda_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match=r"^megl.train: error: --device cuda: CUDA is not available") as e:
        main(["--out", str(tmp_path / "r"), "--device", "cuda"])
    assert "\n" not in str(e.value) and not (tmp_path / "r").exists()


def test_megl_without_training_masks_names_the_cli_fixes(tmp_path):
    sets = [s for s in TINY_SETS if not s.startswith("synthetic=")]
    sets.append('synthetic={"n_train": 12, "n_val": 3, "n_test": 3, "num_classes": 3, "mask_fraction": 0.0}')
    args = ["--out", str(tmp_path / "r"), "--no-progress", "--epochs", "1", "--set", "max_steps_per_epoch=1"]
    args += [x for s in sets for x in ("--set", s)]
    with pytest.raises(SystemExit, match="use_consistency=false.*--method baseline.*uniform_prior=true") as e:
        main(args)
    assert "on_missing" not in str(e.value) and not (tmp_path / "r").exists()
    with pytest.warns(UserWarning, match="uniform prior"):
        assert main(args + ["--set", "uniform_prior=true"]) == 0
    assert float(runs.load_prior(tmp_path / "r").std()) == 0.0


def _save_png(path: Path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_predict_gives_two_images_of_one_name_two_overlays(finished_run, tmp_path, capsys):
    from megl.predict import main as predict

    a, b = _save_png(tmp_path / "a" / "same.png", 1), _save_png(tmp_path / "b" / "same.png", 2)
    assert predict(["--run", str(finished_run), "--out", str(tmp_path / "pred"), a, b]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len({r["overlay"] for r in rows}) == 2 and all(Path(r["overlay"]).is_file() for r in rows)
    with Image.open(rows[0]["overlay"]) as x, Image.open(rows[1]["overlay"]) as y:
        assert not np.array_equal(np.asarray(x), np.asarray(y))


def test_predict_and_evaluate_errors_are_one_line(finished_run, run_copy, tmp_path, monkeypatch):
    from megl.evaluate import main as evaluate
    from megl.predict import main as predict

    img = _save_png(tmp_path / "x.png", 0)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32x32 is then a decompression bomb
    with pytest.raises(SystemExit, match=r"^megl.predict: error: cannot read image .*x.png.*decompression bomb"):
        predict(["--run", str(finished_run), img])
    monkeypatch.undo()
    (run_copy / runs.CHECKPOINT).write_bytes(b"junk")
    for cli, prog, extra in ((predict, "megl.predict", [img]), (evaluate, "megl.evaluate", ["--no-text"])):
        with pytest.raises(SystemExit, match=f"^{prog}: error: checkpoint .* is truncated or corrupt") as e:
            cli(["--run", str(run_copy), *extra])
        assert "\n" not in str(e.value)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match=r"^megl.predict: error: --device cuda: CUDA is not available"):
            predict(["--run", str(finished_run), "--device", "cuda", img])


def test_a_checkpoint_that_does_not_fit_its_config_is_one_line(run_copy):
    from megl.evaluate import main as evaluate

    cfg = json.loads((run_copy / "config.json").read_text())
    (run_copy / "config.json").write_text(json.dumps({**cfg, "tiny_llm_hidden": 64}))  # edited by hand
    with pytest.raises(SystemExit, match=r"^megl.evaluate: error: .*last.safetensors does not fit the model") as e:
        evaluate(["--run", str(run_copy), "--no-text"])
    assert "\n" not in str(e.value) and not (run_copy / "eval").exists()
    with pytest.raises(SystemExit, match=r"^megl.train: error: .*does not fit the model"):
        main(["--resume", str(run_copy), "--epochs", "2", "--no-progress"])

"""`python -m megl.train`: two-step smoke runs per configuration, resume after SIGKILL, torchrun DDP, CLI errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megl import runs
from megl.config import Config
from megl.train import Dist, evaluate, main, train

TINY_SETS = [
    "clip_model=tiny-random", "llm=tiny-random", "image_size=32", "clip_image_size=32", "tiny_clip_width=32", "tiny_llm_hidden=32", "tokenizer_vocab_size=300",
    "batch_size=4", "eval_batch_size=16", "num_overlays=2",
    'synthetic={"n_train": 16, "n_val": 6, "n_test": 6, "num_classes": 3, "mask_fraction": 0.5}',
]
TINY_VIT = dict(backbone="vit_b_16", vit_patch_size=8, vit_layers=2, vit_heads=2, vit_hidden=32, vit_mlp=64)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def tiny_config(**overrides) -> Config:
    from megl.config import apply_overrides

    d = apply_overrides(Config().to_dict(), TINY_SETS)
    d.update({"epochs": 1, "max_steps_per_epoch": 2, **overrides})
    return Config.from_dict(d).validate()


def _changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.equal(a, b)


@pytest.mark.parametrize("name,overrides,text_on", [
    ("resnet18", {}, True),
    ("vit_b_16", TINY_VIT, True),
    ("visual+text", dict(use_consistency=False), True),
    ("text", dict(use_visual=False, use_consistency=False), True),
    ("visual", dict(use_text=False, use_consistency=False), False),
    ("baseline", dict(method="baseline"), False),
])
def test_two_step_training_smoke(tmp_path, name, overrides, text_on):
    from megl.models import build_model

    config = tiny_config(**overrides)
    metrics = train(config, tmp_path, Dist("cpu"), progress=False)
    assert len(metrics) == 1 and metrics[0]["epoch"] == 1
    assert torch.isfinite(torch.tensor(metrics[0]["train_loss"]))
    for split in ("val", "test"):
        assert 0.0 <= metrics[0][split]["accuracy"] <= 1.0 and metrics[0][split]["miou"] is not None
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert runs.load_config(tmp_path) == config
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 2
    state, _, _, train_state = runs.load_checkpoint(tmp_path)
    assert train_state["global_step"] == 2 and train_state["epoch"] == 1
    # compare with the initial weights (a function of the seed): what trained and what did not
    init = build_model(config, ["a", "b", "c"], runs.load_run_tokenizer(tmp_path, config)).checkpoint_state_dict()
    clf = [k for k in state if k.startswith("classifier.") and k.endswith("weight") and "bn" not in k]
    assert any(_changed(state[k], init[k]) for k in clf)
    lora_b = [k for k in state if "lora_B" in k]
    assert lora_b and all(float(init[k].abs().sum()) == 0 for k in lora_b)  # LoRA B starts at zero
    assert any(_changed(state[k], init[k]) for k in lora_b) == text_on
    assert _changed(state["sdtg.W_A.weight"], init["sdtg.W_A.weight"]) == text_on
    clip = [k for k in state if k.startswith("clip_encoder.")]
    assert clip and all(torch.equal(state[k], init[k]) for k in clip)  # frozen


def _cli(out: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "megl.train", "--out", str(out), "--no-progress", "--epochs", "2",
            "--set", "checkpoint_every=1", "--set", "max_steps_per_epoch=3"]
    for s in TINY_SETS:
        args += ["--set", s]
    return args + list(extra)


def _wait_for_checkpoint(proc, path: Path, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists():
            try:
                state = json.loads(path.read_text())
            except (json.JSONDecodeError, FileNotFoundError):  # read while checkpoints/ was re-linked
                state = None
            if state and state["epoch"] == 0 and state["step_in_epoch"] >= 1:
                return state
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before a mid-epoch checkpoint appeared")
        time.sleep(0.02)
    raise AssertionError("no checkpoint within the timeout")


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    ref = subprocess.Popen(_cli(full), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc = subprocess.Popen(_cli(killed), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = _wait_for_checkpoint(proc, killed / "checkpoints" / "last.json")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "metrics.json").exists() and state["global_step"] < 6
    resumed = subprocess.run([sys.executable, "-m", "megl.train", "--resume", str(killed), "--no-progress"], env=ENV,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    _, err = ref.communicate()
    assert ref.returncode == 0, err.decode()[-3000:]
    untimed = lambda entries: [{k: v for k, v in e.items() if k != "train_seconds"} for e in entries]  # noqa: E731
    a = untimed(json.loads((full / "metrics.json").read_text()))
    b = untimed(json.loads((killed / "metrics.json").read_text()))
    assert len(a) == 2 and a == b
    sa, sb = runs.load_checkpoint(full)[0], runs.load_checkpoint(killed)[0]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _Crash(Exception):
    """Stands for a kill: raised by the training loop right after it wrote a checkpoint."""


@pytest.mark.parametrize("method", ["llava", "ft-cot"])
def test_llm_method_trains_in_the_one_loop_and_resumes_exactly(tmp_path, monkeypatch, capsys, method, one_thread):
    import megl.train as T
    from megl.methods import get_method

    def cli(out):
        sets = [*TINY_SETS, "max_steps_per_epoch=2", "checkpoint_every=1", "max_new_tokens=6", "train_eval_size=4"]
        return ["--method", method, "--out", str(out), "--no-progress", "--epochs", "2",
                *[a for s in sets for a in ("--set", s)]]

    full, crashed = tmp_path / "full", tmp_path / "crashed"
    assert main(cli(full)) == 0
    metrics = json.loads((full / "metrics.json").read_text())
    assert [m["epoch"] for m in metrics] == [1, 2] and all(m["test"]["miou"] is None for m in metrics)
    assert not (full / "overlays").exists()  # no saliency to draw
    state, _, _, train_state = runs.load_checkpoint(full)
    assert train_state["global_step"] == 4
    config = runs.load_config(full)
    init = get_method(method).resolve("build_model")(config, ["a", "b", "c"], runs.load_run_tokenizer(full, config))
    init = init.checkpoint_state_dict()
    assert _changed(state["projector.0.weight"], init["projector.0.weight"])
    run = runs.load_run(full)  # rebuilt through the registry: the LLM classifier, scored as training scored it
    assert evaluate(run.model, run.splits["test"], run.config, Dist("cpu")) == metrics[-1]["test"]
    from megl.evaluate import main as evaluate_main

    with pytest.raises(SystemExit, match="LLM classifier.*megl.experiments table2 --methods"):
        evaluate_main(["--run", str(full)])
    # stop right after the checkpoint of step 3 (mid epoch 2), then resume as after a kill
    saves, save = [], T.save_state

    def save_then_crash(*args, **kwargs):
        save(*args, **kwargs)
        saves.append(1)
        if len(saves) == 3:
            raise _Crash

    monkeypatch.setattr(T, "save_state", save_then_crash)
    with pytest.raises(_Crash):
        main(cli(crashed))
    monkeypatch.setattr(T, "save_state", save)
    assert len(json.loads((crashed / "metrics.json").read_text())) == 1
    capsys.readouterr()
    assert main(["--resume", str(crashed), "--no-progress"]) == 0
    assert "at epoch 1 step 1" in capsys.readouterr().err  # continued mid-epoch, not restarted
    untimed = lambda entries: [{k: v for k, v in e.items() if k != "train_seconds"} for e in entries]  # noqa: E731
    assert untimed(json.loads((crashed / "metrics.json").read_text())) == untimed(metrics)
    resumed = runs.load_checkpoint(crashed)[0]
    assert resumed.keys() == state.keys() and all(torch.equal(resumed[k], state[k]) for k in state)


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "megl.train", "--out", str(out), "--no-progress", "--epochs", "1", "--set", "max_steps_per_epoch=2"]
    for s in TINY_SETS:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics) == 1
    _, _, rng, state = runs.load_checkpoint(out)
    assert {k.split("/")[0] for k in rng} == {"0", "1"}  # both ranks' RNG states
    assert {"0/loss", "1/loss"} <= set(rng)  # and each rank's own running loss, for a mid-epoch resume
    assert state["global_step"] == 2
    # metrics gathered over both ranks' shards = a single-process evaluation of the saved model
    run = runs.load_run(out)
    for split in ("val", "test"):
        single = evaluate(run.model, run.splits[split], run.config, Dist("cpu"))
        assert single["accuracy"] == metrics[0][split]["accuracy"]
        assert single["miou"] == pytest.approx(metrics[0][split]["miou"], abs=1e-6)


def test_cli_errors_are_clear(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--preset", "paper-resnet18", "--out", str(tmp_path / "p")])
    err = str(e.value)
    assert err.startswith("megl.train: error: ") and "clip_weights" in err and "llm" in err and "--set" in err
    assert "\n" not in err
    with pytest.raises(SystemExit, match="no_such_key"):
        main(["--set", "no_such_key=1", "--out", str(tmp_path / "q")])
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    with pytest.raises(SystemExit, match="--resume"):
        main(["--out", str(tmp_path / "r")])


@pytest.mark.parametrize("key,value,match", [
    ("checkpoint_every", 0, "checkpoint_every = 0 must be a positive integer"),
    ("batch_size", 0, "batch_size = 0 must be a positive integer"),
    ("epochs", 2.5, "epochs = 2.5 must be a positive integer"),
    ("max_steps_per_epoch", 0, "max_steps_per_epoch = 0 must be a positive integer"),
    ("num_overlays", -1, "num_overlays = -1 must be an integer >= 0"),
])
def test_config_rejects_bad_numbers_up_front(key, value, match):
    with pytest.raises(ValueError, match=match):
        Config.from_dict({key: value}).validate()


def test_training_without_a_validation_split(tmp_path):
    sets = dict(synthetic={"n_train": 16, "n_val": 0, "n_test": 6, "num_classes": 3, "mask_fraction": 0.5})
    metrics = train(tiny_config(**sets), tmp_path / "noval", Dist("cpu"), progress=False)
    assert "val" not in metrics[0] and metrics[0]["test"]["accuracy"] >= 0
    assert not (tmp_path / "noval" / "overlays").exists()


def test_preset_resolves_paper_settings(tmp_path):
    from megl.config import resolve

    clip = tmp_path / "clip.bin"
    clip.write_bytes(b"x")
    (tmp_path / "vicuna").mkdir()
    cfg = resolve("paper-vit-b16", sets=[f"clip_weights={clip}", f"llm={tmp_path / 'vicuna'}", "epochs=3"])
    assert (cfg.image_size, cfg.clip_model, cfg.backbone, cfg.lora_r, cfg.lora_alpha) == (224, "ViT-L-14", "vit_b_16",
                                                                                         128, 256)
    assert cfg.epochs == 3 and cfg.lr_lora == 2e-4 and cfg.lr_projector == 2e-5


def test_training_seed_leaves_the_data_alone():
    # multi-seed tables vary training only: the synthetic data follows data_seed
    small = {"n_train": 16, "n_val": 4, "n_test": 4}
    a, b, c = (runs.make_splits(Config(seed=s, data_seed=ds, synthetic=small)) for s, ds in ((0, 0), (3, 0), (0, 5)))

    def same(x, y):
        return all(torch.equal(x["train"][i]["image"], y["train"][i]["image"]) for i in range(4))

    assert same(a, b) and not same(a, c)

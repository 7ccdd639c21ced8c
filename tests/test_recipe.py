"""The training recipe: learning-rate schedule, its config fields, per-term gradient shares, train accuracy."""
from __future__ import annotations

import math

import pytest
import torch

from megl.config import STORY_DATA, Config
from megl.schedule import lr_factor
from megl.train import Dist, grad_share_summary, train

from test_train import tiny_config


def test_warmup_then_cosine():
    f = [lr_factor(s, 20, schedule="cosine", warmup_fraction=0.2, min_lr_ratio=0.1) for s in range(20)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear warmup over 4 steps, peak at its end
    assert all(a > b for a, b in zip(f[4:], f[5:]))  # then strictly decreasing
    assert f[4] == pytest.approx(1.0) and f[-1] > 0.1
    assert lr_factor(20, 20, schedule="cosine", warmup_fraction=0.2, min_lr_ratio=0.1) == pytest.approx(0.1)
    mid = lr_factor(12, 20, schedule="cosine", warmup_fraction=0.2, min_lr_ratio=0.0)  # halfway through the decay
    assert mid == pytest.approx(0.5)
    assert lr_factor(7, 10, schedule="constant") == 1.0
    assert lr_factor(0, 10, warmup_fraction=0.0) == 1.0  # no warmup: start at the peak


@pytest.mark.parametrize("key,value,match", [
    ("lr_schedule", "step", "lr_schedule = 'step'"),
    ("warmup_fraction", 1.5, "warmup_fraction = 1.5"),
    ("min_lr_ratio", -0.1, "min_lr_ratio = -0.1"),
    ("grad_clip", -1.0, "grad_clip = -1.0"),
    ("weight_decay", "x", "weight_decay = 'x'"),
    ("train_eval_size", -1, "train_eval_size = -1"),
    ("grad_share_batches", 1.5, "grad_share_batches = 1.5"),
])
def test_recipe_fields_are_validated(key, value, match):
    with pytest.raises(ValueError, match=match):
        Config.from_dict({key: value}).validate()


def test_grad_share_summary():
    out = grad_share_summary({"ce": 2.0, "visual": 6.0}, 2)
    assert out["grad_norm"] == {"ce": 1.0, "visual": 3.0}
    assert out["grad_share"] == pytest.approx({"ce": 0.25, "visual": 0.75})
    assert grad_share_summary({}, 0) == {}


@pytest.mark.parametrize("method,terms", [("megl", {"ce", "visual", "text", "background"}), ("gradia", {"ce", "visual"}),
                                          ("baseline", {"ce"})])
def test_metrics_log_each_terms_gradient_share_and_train_accuracy(tmp_path, method, terms):
    config = tiny_config(method=method, epochs=2, max_steps_per_epoch=3, grad_share_batches=2, train_eval_size=5)
    metrics = train(config, tmp_path, Dist("cpu"), progress=False)
    for entry in metrics:
        assert set(entry["grad_share"]) == terms
        assert sum(entry["grad_share"].values()) == pytest.approx(1.0)
        assert all(v > 0 for v in entry["grad_norm"].values())  # every term reaches the classifier
        assert 0.0 <= entry["train"]["accuracy"] <= 1.0
    # cosine schedule: the last step's rate is below the first epoch's
    assert metrics[1]["lr"] < metrics[0]["lr"] < config.lr


def test_constant_schedule_and_no_measurement(tmp_path):
    config = tiny_config(lr_schedule="constant", grad_share_batches=0, train_eval_size=0, grad_clip=0.0)
    (entry,) = train(config, tmp_path, Dist("cpu"), progress=False)
    assert entry["lr"] == config.lr and "grad_share" not in entry and "train" not in entry
    assert math.isfinite(entry["train_loss"])


@torch.no_grad()
def _decoy_mass(run_dir) -> float:
    """Mean share of the (classic, predicted-class) Grad-CAM map inside the decoy box, on the training images."""
    from megl import runs
    from megl.data import collate

    run = runs.load_run(run_dir)
    ds = run.splits["train"].expanded(False)
    batch = collate([ds[i] for i in range(len(ds))])
    x0, y0, x1, y1 = ds.records[0].meta["decoy_box"]
    cell = ds.image_size // run.model.classifier.grid[0]  # the decoy box, rounded out to whole saliency cells
    x0, y0, x1, y1 = x0 // cell * cell, y0 // cell * cell, -(-x1 // cell) * cell, -(-y1 // cell) * cell
    s = run.model.explain(batch["image"])[1].saliency
    return float((s[:, y0:y1, x0:x1].sum((1, 2)) / s.sum((1, 2)).clamp_min(1e-8)).mean())


def test_defaults_move_saliency_off_the_decoy(tmp_path):
    # a decoy that always names the class: plain CE has no reason to look elsewhere; MEGL's defaults must still
    # take the saliency off the decoy corner within a few steps
    data = {**STORY_DATA, "n_train": 24, "n_val": 4, "n_test": 4, "num_classes": 3, "mask_fraction": 0.5}
    mass = {}
    for method in ("baseline", "megl"):
        config = tiny_config(method=method, synthetic=data, epochs=4, max_steps_per_epoch=None, batch_size=8,
                             num_overlays=0, train_eval_size=0, grad_share_batches=0)
        train(config, tmp_path / method, Dist("cpu"), progress=False)
        mass[method] = _decoy_mass(tmp_path / method)
    assert mass["megl"] < 0.5 * mass["baseline"], mass


def test_colour_cue_data():
    from megl.data.synthetic import SyntheticConfig, generate_split

    ds = generate_split(SyntheticConfig(n_train=24, image_size=32, num_classes=6, class_cue="colour",
                                        object_contrast=0.4), "train")
    assert ds.class_names == ["red", "blue", "green", "yellow", "magenta", "cyan"]
    assert all(r.meta["colour"] == ds.class_names[r.label] for r in ds.records)
    assert len({r.meta["shape"] for r in ds.records}) > 1  # the shape is not the class
    for kw, word in ((dict(class_cue="texture"), "class_cue"), (dict(class_cue="colour", num_classes=8), "num_classes"),
                     (dict(object_contrast=0.0), "object_contrast")):
        with pytest.raises(ValueError, match=word):
            SyntheticConfig(**kw)


def test_sweep_rule_best_validation_mean_ties_to_the_first_value():
    from megl.sweep import choose

    assert choose({"0.1": [0.50, 0.60], "1": [0.70, 0.72], "10": [0.71, 0.70]}, tie=0.0) == "1"
    assert choose({"0.1": [0.70, 0.71], "1": [0.71, 0.715]}, tie=0.01) == "0.1"  # within the tie: the first


def test_sweep_over_a_table4_row_names_its_runs_as_table4_does(tmp_path, monkeypatch):
    """--ablation trains (and so reuses) the very runs of `megl.experiments table4`; a wrong pairing is one line."""
    from megl import experiments as ex
    from megl import sweep

    seen = []
    monkeypatch.setattr(ex, "run_one", lambda cfg, out, bb, method, seed, ablation=None, **kw:
                        seen.append(ex.run_name(ex.run_config(cfg, bb, method, seed, ablation), ablation))
                        or {"run_dir": str(tmp_path)})
    monkeypatch.setattr("megl.runs.read_metrics", lambda run_dir: [{"val": {"accuracy": 0.5}}])
    sweep.main(["--method", "megl", "--ablation", "text", "--grid", "lambda_text=1", "--quick", "--out", str(tmp_path)])
    base = ex.base_settings(ex.build_parser().parse_args(["table4", "--quick", "--set", "lambda_text=1"]))
    assert seen == [ex.run_name(ex.run_config(base, "resnet18", "megl", 0, "text"), "text")]
    assert (tmp_path / "megl_text_lambda_text.json").exists()
    for bad in (["--method", "rrr", "--ablation", "text"], ["--method", "megl", "--ablation", "textual"]):
        with pytest.raises(SystemExit, match="--ablation"):
            sweep.main(bad + ["--grid", "lambda_text=1", "--quick", "--out", str(tmp_path)])

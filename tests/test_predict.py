"""`megl.runs.load_run` and `python -m megl.predict` on a saved (tiny, two-step) run."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from megl import runs
from megl.train import Dist, evaluate, train

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from test_train import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    metrics = train(tiny_config(max_new_tokens=5), out, Dist("cpu"), progress=False)
    return out, metrics


def test_load_run_rebuilds_the_trained_model(saved_run):
    out, metrics = saved_run
    run = runs.load_run(out)
    assert not run.model.training
    assert set(run.splits) == {"train", "val", "test"}
    torch.testing.assert_close(run.prior, runs.load_prior(out))
    again = evaluate(run.model, run.splits["val"], run.config, Dist("cpu"))
    assert again["accuracy"] == metrics[-1]["val"]["accuracy"]
    assert again["miou"] == pytest.approx(metrics[-1]["val"]["miou"], abs=1e-6)


def test_load_run_names_what_is_missing(tmp_path):
    with pytest.raises(runs.RunError, match="config.json"):
        runs.load_run(tmp_path)


def test_predict_cli(saved_run, tmp_path, capsys):
    from megl.predict import main

    out, _ = saved_run
    run = runs.load_run(out)
    val = run.splits["val"].expanded(False)
    paths = []
    for i in range(2):
        img = (val[i]["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        p = tmp_path / f"img{i}.png"
        Image.fromarray(img).save(p)
        paths.append(str(p))
    assert main(["--run", str(out), "--out", str(tmp_path / "pred"), *paths]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [r["image"] for r in lines] == paths
    images = torch.stack([val[i]["image"] for i in range(2)])
    probs = run.model.explain(images)[0].softmax(1)
    for i, r in enumerate(lines):
        assert r["label"] == run.model.class_names[r["class_id"]]
        assert r["class_id"] == int(probs[i].argmax())
        assert r["probability"] == pytest.approx(float(probs[i].max()), abs=1e-5)
        assert isinstance(r["rationale"], str)
        with Image.open(r["overlay"]) as im:
            assert im.format == "PNG" and im.size == (2 * 32 * 4, 32 * 4)  # image | overlay, 4x upscaled


def test_predict_missing_image_is_an_error(saved_run, tmp_path):
    from megl.predict import main

    with pytest.raises(SystemExit):
        main(["--run", str(saved_run[0]), str(tmp_path / "nope.png")])

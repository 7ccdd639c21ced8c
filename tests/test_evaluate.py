"""evaluate_split on a tiny model, the report files, and `python -m megl.evaluate` on a constructed run."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megl.metrics import classification_metrics, visual_metrics
from megl.report import table2, table3, write_html_report


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory as megl.train leaves it (config, prior, tokenizer, checkpoint), untrained weights."""
    from megl import runs
    from megl.config import Config
    from megl.data import mean_mask_prior
    from megl.models import build_model
    from megl.models.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("run")
    cfg = Config(clip_model="tiny-random", llm="tiny-random", image_size=32, clip_image_size=32, tiny_clip_width=32,
                 tiny_llm_hidden=32, tokenizer_vocab_size=300, max_new_tokens=6,
                 synthetic={"n_train": 24, "n_val": 4, "n_test": 10, "num_classes": 3, "mask_fraction": 0.5})
    splits = runs.make_splits(cfg)
    train = splits["train"]
    tok = train_tokenizer([t for r in train.records for t in r.references], train.class_names, cfg.tokenizer_vocab_size)
    model = build_model(cfg, train.class_names, tok)
    prior = mean_mask_prior(train)
    runs.save_config(out, cfg)
    runs.save_prior(out, prior)
    runs.save_tokenizer(out, tok)
    runs.save_checkpoint(out, model.checkpoint_state_dict(), {"state": {}, "param_groups": []}, {}, {"epoch": 0})
    return {"dir": out, "model": model, "splits": splits, "prior": prior}


def test_evaluate_split_matches_direct_metrics_and_restores_mode(tiny_run):
    from megl.evaluate import evaluate_split

    model, test, prior = tiny_run["model"], tiny_run["splits"]["test"], tiny_run["prior"]
    model.train()
    out = evaluate_split(model, test, prior, batch_size=3, faithfulness=True, fractions=(0.1, 0.5), report_samples=4)
    assert model.training, "evaluate_split must restore the model's mode"
    model.eval()
    batch = {k: torch.stack([test[i][k] if torch.is_tensor(test[i][k]) else torch.tensor(test[i][k])
                             for i in range(len(test))]) for k in ("image", "label", "mask", "has_mask")}
    logits, sal = model.explain(batch["image"])
    expected = classification_metrics(batch["label"], logits.argmax(1))
    for k in ("accuracy", "precision", "recall", "f1"):
        assert out[k] == pytest.approx(expected[k]), k
    vis = visual_metrics(sal.saliency, batch["mask"], batch["has_mask"])
    assert out["n_annotated"] == int(batch["has_mask"].sum()) > 0
    assert out["miou"] == pytest.approx(vis["miou"], abs=1e-6)
    assert out["exp_f1"] == pytest.approx(vis["exp_f1"], abs=1e-6)
    p = (prior - prior.min()) / (prior.max() - prior.min())
    assert out["miou_prior"] == pytest.approx(visual_metrics(p.expand_as(sal.saliency), batch["mask"],
                                                             batch["has_mask"])["miou"])
    assert -1 <= out["comprehensiveness"] <= 1 and -1 <= out["sufficiency"] <= 1
    assert set(out["faithfulness"]["per_fraction"]) == {"comprehensiveness@0.1", "sufficiency@0.1",
                                                        "comprehensiveness@0.5", "sufficiency@0.5"}
    assert [s["id"] for s in out["samples"]] == [test[i]["id"] for i in (0, 3, 6, 9)]
    assert "text" not in out  # off by default: the per-epoch call stays cheap


def test_training_evaluation_agrees_with_evaluate_split(tiny_run):
    from megl.config import Config
    from megl.evaluate import evaluate_split
    from megl.train import Dist, evaluate

    model, test = tiny_run["model"], tiny_run["splits"]["test"]
    per_epoch = evaluate(model, test, Config(eval_batch_size=4), Dist("cpu"))
    full = evaluate_split(model, test, batch_size=3)
    for k in ("accuracy", "precision", "recall", "f1", "miou"):
        assert per_epoch[k] == pytest.approx(full[k], abs=1e-6), k


def test_tables_have_the_paper_layout():
    t2 = table2([{"backbone": "resnet18", "method": "megl", "accuracy": 0.74125, "precision": 0.5689,
                  "recall": 0.6595, "f1": 0.58, "miou": None}], "Object-ME")
    lines = t2.splitlines()
    assert lines[2] == "| Backbone | Method | Accuracy | Precision | Recall | F1 Score | mIoU |"
    assert lines[4] == "| ResNet18 | MEGL | 0.7412 | 0.5689 | 0.6595 | 0.5800 | n/a |"
    t3 = table3([{"method": "MEGL-ViT-B/16", "clipscore": 0.6698, "bleu4": 0.7817, "meteor": 0.6701,
                  "rouge_l": 0.7863, "spice": 0.7863, "cider": 7.8585}])
    assert t3.splitlines()[2] == "| Method | CLIPScore | B4 | M | R | S | C |"
    assert t3.splitlines()[4] == "| MEGL-ViT-B/16 | 0.6698 | 0.7817 | 0.6701 | 0.7863 | 0.7863 | 7.8585 |"


def _img_srcs(html_path: Path) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html_path.read_text())


def test_html_report_links_the_right_images(tmp_path):
    torch.manual_seed(0)
    samples = []
    for i in range(3):
        img = torch.rand(3, 8, 8)
        sal = torch.zeros(8, 8)
        sal[i, i] = 1.0
        samples.append({"id": f"img/{i}", "image": img, "saliency": sal, "mask": (sal > 0).float(),
                        "has_mask": i != 2, "label": i, "pred": 0, "iou": 1.0, "generated": "a <b> red square",
                        "references": ["ref one", "ref & two"]})
    path = Path(write_html_report(samples, str(tmp_path / "eval"), title="t", class_names=["a", "b", "c"]))
    srcs = _img_srcs(path)
    assert len(srcs) == 3 + 3 + 2                     # image + saliency each, masks only where annotated
    assert all(not s.startswith("/") and (path.parent / s).is_file() for s in srcs)
    text = path.read_text()
    assert "a &lt;b&gt; red square" in text and "ref &amp; two" in text and "no human mask" in text
    for i, s in enumerate(samples):                   # the i-th image file holds the i-th image (upscaled)
        src = next(x for x in srcs if re.search(rf"/{i:03d}_.*_image\.png$", x))
        png = np.asarray(Image.open(path.parent / src)).astype(np.float32) / 255
        k = png.shape[0] // 8
        assert np.abs(png[::k, ::k] - s["image"].permute(1, 2, 0).numpy()).max() < 1 / 255 + 1e-6
    # the report folder is self-contained: moving it keeps the links valid
    moved = tmp_path / "moved"
    shutil.move(str(path.parent), moved)
    assert all((moved / s).is_file() for s in srcs)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="text metrics need Java")
def test_cli_writes_metrics_tables_and_report(tiny_run):
    from megl.evaluate import main

    run = tiny_run["dir"]
    assert main(["--run", str(run), "--limit", "5", "--report-samples", "3", "--max-new-tokens", "4",
                 "--batch-size", "4", "--quiet"]) == 0
    ev = run / "eval"
    payload = json.loads((ev / "metrics.json").read_text())
    m = payload["metrics"]
    assert payload["split"] == "test" and m["n"] == 5 and payload["settings"]["max_new_tokens"] == 4
    for key in ("accuracy", "precision", "recall", "f1", "miou", "exp_f1", "comprehensiveness", "sufficiency",
                "clipscore"):
        assert isinstance(m[key], float), key
    for key in ("bleu4", "meteor", "rouge_l", "cider"):
        assert isinstance(m["text"][key], float), key
    assert len(m["rationales"]) == 5
    assert any("run's own CLIP" in n for n in payload["notes"])
    tables = (ev / "tables.md").read_text()
    assert "| Backbone | Method | Accuracy | Precision | Recall | F1 Score | mIoU |" in tables
    assert "| Method | CLIPScore | B4 | M | R | S | C |" in tables
    srcs = _img_srcs(ev / "report.html")
    assert len(srcs) >= 6 and all((ev / s).is_file() for s in srcs)
    # another split goes to its own folder and leaves the test report alone
    assert main(["--run", str(run), "--split", "val", "--no-text", "--no-faithfulness", "--report-samples", "1",
                 "--quiet"]) == 0
    assert json.loads((ev / "val" / "metrics.json").read_text())["split"] == "val"
    assert json.loads((ev / "metrics.json").read_text())["split"] == "test"


def test_cli_errors_name_the_fix(tmp_path, tiny_run):
    from megl.evaluate import main

    with pytest.raises(SystemExit, match="megl.train"):
        main(["--run", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="available: test, train, val"):
        main(["--run", str(tiny_run["dir"]), "--split", "holdout", "--no-text"])

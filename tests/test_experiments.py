"""`python -m megl.experiments`: table layouts from known results, run naming, and the whole command on tiny
settings (every row of Table 2 / 3 / 4, runs reused across invocations)."""
from __future__ import annotations

import hashlib
import json
import math

import pytest

from megl import experiments as ex


def payload(acc, f1=None, miou=0.3, **more):
    return {"metrics": {"accuracy": acc, "precision": acc, "recall": acc, "f1": acc if f1 is None else f1,
                        "miou": miou, **more}}


def test_aggregate_mean_and_sample_std():
    agg = ex.aggregate([payload(0.5), payload(0.7)], ("accuracy", "miou"))
    m, sd = agg["accuracy"]
    assert m == pytest.approx(0.6) and sd == pytest.approx(math.sqrt(0.02))
    assert agg["miou"] == (pytest.approx(0.3), pytest.approx(0.0))
    assert ex.aggregate([payload(0.5)], ("accuracy",))["accuracy"] == (0.5, None)
    assert ex.aggregate([payload(0.5, miou=None)], ("miou",))["miou"] == (None, None)
    assert ex.cell((0.61234, None)) == "0.6123" and ex.cell((0.5, 0.01)) == "0.5000 ± 0.0100"
    assert ex.cell((None, None)) == "-"


def test_table2_layout_and_who_beats_the_plain_classifier():
    text = {"clipscore": 0.6, "bleu4": 0.1, "meteor": 0.2, "rouge_l": 0.3, "spice": None, "cider": 0.4}
    results = {(None, "llava"): [payload(0.8, miou=None)], (None, "ft-cot"): [payload(0.82, miou=None, **text)]}
    accs = {"baseline": 0.5, "cdep": 0.45, "haics": 0.55, "res-g": 0.5, "res-l": 0.6, "gradia": 0.52, "rrr": 0.3,
            "megl": 0.65}
    for bb in ("resnet18", "vit_b_16"):
        for m, a in accs.items():
            results[(bb, m)] = [payload(a, **(text if m == "megl" else {}))]
    results[("vit_b_16", "cdep")] = []  # what main() stores for an unsupported pair
    md = ex.table2_markdown(results, ["resnet18", "vit_b_16"], list(ex.TABLE2_METHODS), "synthetic")
    lines = md.splitlines()
    rows = [ln for ln in lines if ln.startswith("| ") and "---" not in ln]
    t2 = [r for r in rows if r.split("|")[1].strip() in ("LLaVA", "ResNet18", "ViT-B/16")]
    assert len(t2) == 2 + 2 * 8
    assert t2[0].startswith("| LLaVA | - | 0.8000") and t2[0].rstrip().endswith("| - |")  # no mIoU
    assert t2[1].startswith("| LLaVA | Fine-Tune-CoT | 0.8200")
    assert [r.split("|")[2].strip() for r in t2[2:10]] == ["-", "CDEP", "HAICS", "RES-G", "RES-L", "GRADIA", "RRR",
                                                           "MEGL"]
    assert [r for r in t2 if r.startswith("| ViT-B/16 | CDEP |")][0].count("n/a") == 5
    assert "CDEP on ViT-B/16: n/a" in md
    t3 = [r for r in rows if r.split("|")[1].strip().startswith(("LLaVA-Fine", "MEGL-"))]
    assert [r.split("|")[1].strip() for r in t3] == ["LLaVA-Fine-tune-CoT", "MEGL-ResNet18", "MEGL-ViT-B/16"]
    assert "| 0.6000 | 0.1000 | 0.2000 | 0.3000 | n/a | 0.4000 |" in t3[1]
    beats = [ln for ln in lines if ln.startswith("- ResNet18")][0]
    # strictly better accuracy than 0.5: LLaVA, LLaVA-Fine-tune-CoT, HAICS, RES-L, GRADIA, MEGL (not RES-G at 0.5)
    for name in ("LLaVA (+0.3000", "LLaVA-Fine-tune-CoT (+0.3200", "HAICS (+0.0500", "RES-L (+0.1000",
                 "GRADIA (+0.0200", "MEGL (+0.1500"):
        assert name in beats
    for name in ("CDEP", "RES-G", "RRR"):
        assert name not in beats


def test_a_gain_inside_the_seed_spread_is_marked():
    results = {("resnet18", "baseline"): [payload(0.50), payload(0.60)],  # mean 0.55, std 0.0707
               ("resnet18", "gradia"): [payload(0.58), payload(0.60)],  # +0.04: inside the spread
               ("resnet18", "res-l"): [payload(0.70), payload(0.72)]}  # +0.16: outside
    md = ex.table2_markdown(results, ["resnet18"], ["baseline", "gradia", "res-l"], "synthetic")
    beats = [ln for ln in md.splitlines() if ln.startswith("- ResNet18")][0]
    assert "GRADIA (+0.0400 acc, +0.0400 F1, within the seed spread)" in beats
    assert "RES-L (+0.1600 acc, +0.1600 F1)" in beats


def test_table4_change_in_points():
    results = {("resnet18", "full"): [payload(0.50)], ("resnet18", "paper"): [payload(0.47)],
               ("resnet18", "visual+text"): [payload(0.49)],
               ("resnet18", "text"): [payload(0.45)], ("resnet18", "visual"): [payload(0.52)],
               ("resnet18", "none"): [payload(0.40)]}
    md = ex.table4_markdown(results, ["resnet18"], list(ex.ABLATION_ORDER), "synthetic")
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert [r.split("|")[2].strip() for r in rows] == ["MEGL", "MEGL, paper objective", "Visual+Text", "Text",
                                                       "Visual", "-"]
    assert [r.split("|")[4].strip() for r in rows] == ["-", "-3.00%", "-1.00%", "-5.00%", "+2.00%", "-10.00%"]
    assert rows[0].split("|")[1].strip() == "ResNet18" and rows[1].split("|")[1].strip() == ""


def test_run_names_identify_the_configuration(monkeypatch, tmp_path):
    args = ex.build_parser().parse_args(["table2", "--quick"])
    base = ex.base_settings(args)
    a = ex.run_config(base, "resnet18", "megl", 0)
    assert ex.run_name(a) == ex.run_name(ex.run_config(base, "resnet18", "megl", 0))
    assert ex.run_name(a) == ex.run_name(ex.run_config(base, "resnet18", "megl", 0, None))  # table4 "full"
    others = {ex.run_name(ex.run_config(base, "resnet18", "megl", 1)),
              ex.run_name(ex.run_config(base, "vit_b_16", "megl", 0)),
              ex.run_name(ex.run_config(base, "resnet18", "gradia", 0)),
              ex.run_name(ex.run_config(base, "resnet18", "megl", 0, "text"), "text")}
    assert ex.run_name(a) not in others and len(others) == 4
    # a whole number names the same run as an int or a float; another value does not
    one, one_f, more = ({**base, "lambda_visual": v, "method_args": {"rrr_lambda": v}} for v in (1, 1.0, 1.5))
    def name(cfg, method):
        return ex.run_name(ex.run_config(cfg, "resnet18", method, 0))
    assert name(one, "megl") == name(one_f, "megl") and name(one, "rrr") == name(one_f, "rrr")
    assert name(one, "megl") != name(more, "megl")
    # a method's package default is part of the name: a run made before the default changed is not reused
    from megl.losses.rrr import DEFAULTS as RRR_DEFAULTS

    r = ex.run_config(base, "resnet18", "rrr", 0)
    before = ex.run_name(r)
    monkeypatch.setitem(RRR_DEFAULTS, "rrr_lambda", RRR_DEFAULTS["rrr_lambda"] * 10)
    assert ex.run_name(r) != before
    assert ex.run_name(r) == ex.run_name(ex.run_config({**base, "method_args": dict(RRR_DEFAULTS)},
                                                       "resnet18", "rrr", 0))  # the same as setting it
    # the LLM methods ignore the backbone
    assert ex.run_name(ex.run_config(base, "resnet18", "llava", 0)).startswith("llm_llava_seed0_")
    # an option added later names, at its default, the run it named before it existed; another value does not
    assert all(getattr(a, k) == v for k, v in ex.NEW_OPTION_DEFAULTS.items())
    old = {k: v for k, v in a.to_dict().items() if k not in ex.NEW_OPTION_DEFAULTS}
    assert ex.run_name(a).endswith(hashlib.sha1(json.dumps(ex._integral(old), sort_keys=True).encode()).hexdigest()[:10])
    # a dataset folder names one run whether --out was relative or absolute; another folder does not
    monkeypatch.chdir(tmp_path)
    for folder in ("x", "y"):
        (tmp_path / "runs" / "data" / folder).mkdir(parents=True)
    rel, absolute = ({**base, "data_root": root} for root in ("runs/data/x", str(tmp_path / "runs/data/x")))
    assert name(rel, "megl") == name(absolute, "megl") != name({**base, "data_root": "runs/data/y"}, "megl")
    for key, other in (("rationale_prompt", "image"), ("sdtg_image_tokens", False)):
        assert ex.run_name(ex.run_config({**base, key: other}, "resnet18", "megl", 0)) != ex.run_name(a)


TINY = ["--seeds", "0", "--epochs", "1", "--threads", "1", "--set", "clip_model=tiny-random", "--set", "llm=tiny-random",
        "--set", "image_size=32", "--set", "synthetic.n_train=16", "--set", "synthetic.n_val=4",
        "--set", "synthetic.n_test=8", "--set", "batch_size=8", "--set", "max_steps_per_epoch=1",
        "--set", "vit_layers=1", "--set", "vit_heads=1", "--set", "vit_hidden=16", "--set", "vit_mlp=16",
        "--set", "clip_image_size=32", "--set", "max_new_tokens=4", "--set", "num_overlays=0"]


@pytest.mark.slow
def test_table_commands_produce_every_row(tmp_path, capsys):
    out = str(tmp_path / "exp")
    assert ex.main(["table2", "--out", out, *TINY]) == 0
    md = (tmp_path / "exp" / "table2.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln]
    first = [r.split("|")[1].strip() for r in rows]
    assert first.count("LLaVA") == 2 and first.count("ResNet18") == 8 and first.count("ViT-B/16") == 8
    assert {"LLaVA-Fine-tune-CoT", "MEGL-ResNet18", "MEGL-ViT-B/16"} <= set(first)  # Table 3
    for r in rows:
        if r.split("|")[1].strip() in ("ResNet18", "ViT-B/16"):
            if r.startswith("| ViT-B/16 | CDEP |"):
                assert r.count("n/a") == 5  # CD has no ViT rules: reported, not run
            else:
                assert "n/a" not in r and r.count(" - ") <= 1  # every cell filled (method "-" = the baseline)
    assert "CDEP on ViT-B/16: n/a" in md
    saved = json.loads((tmp_path / "exp" / "table2.json").read_text())
    assert len(saved["runs"]) == 18 and saved["runs"]["vit_b_16/cdep"] == [] and saved["seeds"] == [0]
    capsys.readouterr()
    # table4 reuses the full-MEGL runs of table2 and trains the five other module sets (one backbone: the rows'
    # logic is per backbone, and each backbone's runs cost as much as the rest of this test)
    assert ex.main(["table4", "--out", out, "--backbones", "resnet18", *TINY]) == 0
    err = capsys.readouterr().err
    assert "training megl (" not in err and err.count("training megl/") == 5
    md4 = (tmp_path / "exp" / "table4.md").read_text()
    rows4 = [ln for ln in md4.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert [r.split("|")[2].strip() for r in rows4] == ["MEGL", "MEGL, paper objective", "Visual+Text", "Text",
                                                        "Visual", "-"]
    # a second table2 invocation retrains nothing
    assert ex.main(["table2", "--out", out, *TINY]) == 0
    assert "[experiments] training" not in capsys.readouterr().err

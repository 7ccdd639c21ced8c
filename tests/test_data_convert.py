"""python -m megl.data.convert vqax|actx on small fixture files written here, then loaded with load_splits."""
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from megl.data import DataWarning, load_splits
from megl.data import convert
from megl.data.convert import main

H, W = 20, 30  # fixture image size (rows, cols)


def _img(path, k):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((H, W, 3), 40 + 20 * (k % 8), np.uint8)
    arr[:, : W // 3, k % 3] = 220
    Image.fromarray(arr).save(path)


def _dump(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.fixture
def vqax_raw(tmp_path):
    """Original VQA-X layout: {question_id: [explanations]} + VQA v2 questions/annotations + COCO folders."""
    q = [  # (qid, image_id, question, answer, answer_type, explanations, split)
        (1001, 11, "What animal is this?", "zebra", "other", ["it has black and white stripes"], "train"),
        (1002, 12, "What animal is shown?", "Zebra", "other", ["stripes all over"], "train"),
        (1003, 13, "What animal is this?", "giraffe", "other", ["long neck"], "train"),
        (1004, 14, "Is it sunny?", "yes", "yes/no", ["the sky is blue"], "train"),
        (1005, 15, "How many animals?", "2", "number", ["two heads"], "train"),
        (1006, 11, "What is in the picture?", "zebra", "other", ["a striped horse"], "train"),  # same image
        (1007, 99, "What animal is this?", "giraffe", "other", ["spots"], "train"),  # image missing
        (1008, 16, "What is flying?", "kite", "other", ["on a string"], "train"),  # rare class
        (1010, 17, "What animal is this?", "zebra", "other", [], "train"),  # no explanation
        (2001, 21, "What animal is this?", "zebra", "other", ["stripes", "black and white"], "test"),
        (2002, 22, "What animal is this?", "giraffe", "other", ["long neck", "tall", "spotted coat"], "test"),
        (2003, 23, "What animal is it?", "giraffe", "other", ["very tall"], "test"),
    ]
    exp = {"train": {}, "test": {}}
    questions, annotations = [], []
    for qid, iid, text, ans, atype, exps, split in q:
        exp[split][str(qid)] = exps
        questions.append({"question_id": qid, "image_id": iid, "question": text})
        annotations.append({"question_id": qid, "image_id": iid, "multiple_choice_answer": ans, "answer_type": atype,
                            "answers": [{"answer": ans, "answer_id": 1}]})
        if iid != 99:
            coco = "train2014" if split == "train" else "val2014"
            _img(tmp_path / "coco" / coco / f"COCO_{coco}_{iid:012d}.jpg", iid)
    exp["train"]["1009"] = ["orphan explanation"]  # not in the VQA v2 files
    vis = tmp_path / "visual" / "test"
    vis.mkdir(parents=True)
    m = np.zeros((H, W), np.uint8)
    m[2:10, 5:20] = 255
    Image.fromarray(m).save(vis / "2001.png")
    a1, a2 = np.zeros((H, W), np.float32), np.zeros((H, W), np.float32)
    a1[0:10], a2[0:5] = 1.0, 1.0
    np.save(vis / "2002_1.npy", a1)
    np.save(vis / "2002_2.npy", a2)
    (tmp_path / "visual" / "test" / "2003.png").write_bytes(b"broken")  # unreadable mask: counted, sample kept
    return {
        "train": _dump(tmp_path / "textual" / "train_exp_anno.json", exp["train"]),
        "test": _dump(tmp_path / "textual" / "test_exp_anno.json", exp["test"]),
        "questions": _dump(tmp_path / "v2_OpenEnded_mscoco_questions.json", {"questions": questions}),
        "annotations": _dump(tmp_path / "v2_mscoco_annotations.json", {"annotations": annotations}),
        "coco": [str(tmp_path / "coco" / "train2014"), str(tmp_path / "coco" / "val2014")],
        "visual": str(vis), "a1": a1, "a2": a2, "tmp": tmp_path,
    }


def _vqax_args(raw, out, *extra):
    return ["vqax", "--exp", f"train={raw['train']}", "--exp", f"test={raw['test']}", "--questions", raw["questions"],
            "--annotations", raw["annotations"], "--images", raw["coco"][0], "--images", raw["coco"][1],
            "--visual", raw["visual"], "--out", str(out), *extra]


def test_vqax_original_release(vqax_raw, capsys):
    out = vqax_raw["tmp"] / "object-me"
    assert main(_vqax_args(vqax_raw, out, "--min-count", "2")) == 0
    printed = capsys.readouterr().out
    ann = json.loads((out / "exp_annotation.json").read_text())
    assert sorted(ann) == ["1001", "1002", "1003", "2001", "2002", "2003"]
    assert json.loads((out / "classes.json").read_text()) == ["giraffe", "zebra"]
    assert ann["1002"]["ans"] == "zebra" and ann["1002"]["class_id"] == 1 and ann["1003"]["class_id"] == 0
    assert ann["1001"]["split"] == "train" and ann["2002"]["split"] == "test"
    assert ann["2002"]["exp"] == ["long neck", "tall", "spotted coat"]
    assert ann["1001"]["image_path"] == "images/COCO_train2014_000000000011.jpg"
    assert (out / "images" / "COCO_val2014_000000000023.jpg").is_file()
    assert ann["1001"]["visual_exp"] == "" and ann["2003"]["visual_exp"] == ""
    assert np.load(out / ann["2002"]["visual_exp"]).shape == (2, H, W)
    # each filter's count is printed, and the Table-1 statistics
    for line in ("dropped       1  answer type not in --answer-types (yes/no)",
                 "dropped       1  answer type not in --answer-types (number)",
                 "dropped       1  another question on the same image", "dropped       1  image not found",
                 "dropped       1  class filter", "dropped       1  question_id not in --questions",
                 "dropped       1  no explanation", "mask ignored   1  unreadable"):
        assert line in printed, printed
    assert "| Object-ME (converted) / train | 3 | 3 | 0 | 2 | 3 |" in printed
    assert "| Object-ME (converted) / test | 3 | 3 | 2 | 2 | 6 |" in printed
    assert "| **Object-ME (converted)** | 6 | 6 | 2 | 2 | 9 |" in printed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # val is carved from train (the release has no val file here)
        sp = load_splits(out, image_size=H, val_fraction=0.0)
    assert sp["train"].class_names == ["giraffe", "zebra"]
    assert [r.id for r in sp["test"].records] == ["2001", "2002", "2003"]
    test = sp["test"]
    assert test.has_masks.tolist() == [True, True, False]
    mean = (vqax_raw["a1"] + vqax_raw["a2"]) / 2  # annotators averaged, then min-max normalised (already 0..1)
    from megl.data import resize_mask
    import torch
    assert torch.allclose(test.mask(1), resize_mask(torch.from_numpy(mean), H), atol=2e-3)
    assert test[1]["references"] == ["long neck", "tall", "spotted coat"]


def test_vqax_class_options(vqax_raw, capsys):
    out = vqax_raw["tmp"] / "o1"
    main(_vqax_args(vqax_raw, out, "--max-classes", "1", "--min-count", "1", "--answer-types", ""))
    ann = json.loads((out / "exp_annotation.json").read_text())
    assert json.loads((out / "classes.json").read_text()) == ["giraffe"]  # 3 giraffes, 3 zebras: tie -> name order
    assert {it["ans"] for it in ann.values()} == {"giraffe"}
    out2 = vqax_raw["tmp"] / "o2"
    main(_vqax_args(vqax_raw, out2, "--classes", "kite,giraffe", "--question-regex", r"^what (animal|is flying)"))
    ann2 = json.loads((out2 / "exp_annotation.json").read_text())
    assert json.loads((out2 / "classes.json").read_text()) == ["kite", "giraffe"]
    assert {(it["ans"], it["class_id"]) for it in ann2.values()} == {("kite", 0), ("giraffe", 1)}
    assert "question does not match --question-regex" in capsys.readouterr().out


def test_vqax_nle_style_records(tmp_path, capsys):
    recs = {}
    for k, (ans, exps) in enumerate([("dog", ["it barks"]), ("dog", ["a leash"]), ("cat", ["whiskers", "meows"]),
                                     ("yes", ["obviously"])]):
        iid = 31 + k
        _img(tmp_path / "val2014" / f"COCO_val2014_{iid:012d}.jpg", k)
        recs[str(3000 + k)] = {"question": "what is it?", "image_id": iid, "image_name": f"COCO_val2014_{iid:012d}.jpg",
                               "answers": [{"answer": ans, "answer_confidence": "yes", "answer_id": 1}] * 3
                               + [{"answer": "other", "answer_confidence": "maybe", "answer_id": 4}],
                               "explanation": exps}
    f = _dump(tmp_path / "vqaX_test.json", recs)
    out = tmp_path / "out"
    main(["vqax", "--exp", f, "--images", str(tmp_path / "val2014"), "--out", str(out), "--min-count", "1"])
    ann = json.loads((out / "exp_annotation.json").read_text())
    assert {k: v["ans"] for k, v in ann.items()} == {"3000": "dog", "3001": "dog", "3002": "cat"}
    assert "split" not in ann["3000"] and ann["3002"]["exp"] == ["whiskers", "meows"]
    sp = load_splits(out, image_size=16, val_fraction=0.0, test_fraction=0.0)
    assert sp["train"].num_images == 3 and sp["train"].class_names == ["cat", "dog"]


@pytest.fixture
def actx_raw(tmp_path):
    entries = {
        "k1": {"img_id": "000000001", "ans": "skiing", "exp": ["he is on skis", "snow everywhere"]},
        "k2": {"img_id": "000000002", "ans": "skiing", "exp": ["poles in hands"]},
        "k3": {"img_id": "000000003.jpg", "ans": "running", "exp": ["on a track"]},
        "k4": {"img_id": "000000004", "ans": "running", "exp": []},  # no explanation
        "k5": {"img_id": "000000005", "ans": "fishing", "exp": ["holds a rod"]},
        "k6": {"img_id": "000000404", "ans": "running", "exp": ["fast"]},  # image missing
        "k7": {"ans": "running", "exp": ["no image field"]},
    }
    for k in (1, 2, 3, 4, 5):
        _img(tmp_path / "mpii" / f"{k:09d}.jpg", k)
    vis = tmp_path / "visual"
    vis.mkdir()
    m = np.zeros((H, W), np.float32)
    m[5:15, 10:20] = 0.8
    np.save(vis / "k1.npy", m)
    np.save(vis / "000000003.npy", np.stack([m, m]))  # found by image stem
    np.save(vis / "k2.npy", np.zeros((W, H), np.float32))  # transposed: aspect mismatch, ignored
    return {"exp": _dump(tmp_path / "textual" / "exp_train_split.json", entries), "images": str(tmp_path / "mpii"),
            "visual": str(vis), "tmp": tmp_path}


def test_actx(actx_raw, capsys):
    out = actx_raw["tmp"] / "action-me"
    main(["actx", "--exp", f"train={actx_raw['exp']}", "--images", actx_raw["images"], "--visual", actx_raw["visual"],
          "--out", str(out)])
    printed = capsys.readouterr().out
    ann = json.loads((out / "exp_annotation.json").read_text())
    assert sorted(ann) == ["k1", "k2", "k3", "k5"]
    assert json.loads((out / "classes.json").read_text()) == ["fishing", "running", "skiing"]
    assert ann["k1"]["visual_exp"] == "masks/k1.npy" and ann["k3"]["visual_exp"] == "masks/k3.npy"
    assert ann["k2"]["visual_exp"] == "" and ann["k5"]["visual_exp"] == ""
    assert "dropped       1  no explanation (fields exp,explanation,explanations)" in printed
    assert "dropped       1  image not found in --images" in printed
    assert "dropped       1  no image name" in printed and "mask ignored   1  aspect ratio" in printed
    assert "| **Action-ME (converted)** | 4 | 4 | 2 | 3 | 5 |" in printed
    sp = load_splits(out, image_size=16, val_fraction=0.0, test_fraction=0.0)
    assert sp["train"].num_images == 4 and int(sp["train"].has_masks.sum()) == 2
    # explicit classes and min-count
    out2 = actx_raw["tmp"] / "a2"
    main(["actx", "--exp", actx_raw["exp"], "--images", actx_raw["images"], "--out", str(out2), "--min-count", "2"])
    assert json.loads((out2 / "classes.json").read_text()) == ["skiing"]


def test_actx_nle_field_names(tmp_path):
    _img(tmp_path / "mpii" / "015601864.jpg", 1)
    _img(tmp_path / "mpii" / "015601865.jpg", 2)
    f = _dump(tmp_path / "actX_train.json", {
        "0": {"image_name": "015601864.jpg", "answers": "curling", "explanation": ["a stone on ice"]},
        "1": {"image_name": "015601865.jpg", "answers": "curling", "explanation": ["sweeping ice"]},
    })
    out = tmp_path / "out"
    main(["actx", "--exp", f, "--images", str(tmp_path / "mpii"), "--out", str(out)])
    ann = json.loads((out / "exp_annotation.json").read_text())
    assert ann["0"] == {"class_id": 0, "ans": "curling", "image_path": "images/015601864.jpg", "visual_exp": "",
                        "exp": ["a stone on ice"], "source": "act-x"}
    # a field list that matches nothing drops everything, with a clear error
    with pytest.raises(SystemExit, match="no sample survived"):
        main(["actx", "--exp", f, "--images", str(tmp_path / "mpii"), "--out", str(tmp_path / "o2"),
              "--answer-field", "activity"])


def test_converter_errors(tmp_path, vqax_raw):
    with pytest.raises(SystemExit, match="--exp file .*missing.json not found"):
        main(["actx", "--exp", str(tmp_path / "missing.json"), "--images", str(tmp_path), "--out", str(tmp_path / "o")])
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(SystemExit, match="not valid JSON \\(line 1"):
        main(["actx", "--exp", str(bad), "--images", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="is not a directory"):
        main(["actx", "--exp", str(bad), "--images", str(tmp_path / "nodir"), "--out", str(tmp_path / "o")])
    out = tmp_path / "twice"
    main(_vqax_args(vqax_raw, out, "--min-count", "1"))
    with pytest.raises(SystemExit, match="exists: pass --overwrite"):
        main(_vqax_args(vqax_raw, out))
    (out / "images" / "stale.jpg").write_bytes(b"x")
    assert main(_vqax_args(vqax_raw, out, "--overwrite", "--min-count", "2")) == 0
    assert not (out / "images" / "stale.jpg").exists()
    with pytest.raises(SystemExit, match="no sample survived"):  # default --min-count 10 leaves nothing
        main(_vqax_args(vqax_raw, tmp_path / "none"))
    assert not (tmp_path / "none").exists()  # nothing written
    with pytest.raises(SystemExit, match="give the VQA v2 --questions and --annotations"):
        main(["vqax", "--exp", vqax_raw["train"], "--images", vqax_raw["coco"][0], "--out", str(tmp_path / "o4")])
    with pytest.raises(SystemExit, match="VQA v2 question file"):
        main(["vqax", "--exp", vqax_raw["train"], "--questions", vqax_raw["annotations"], "--images",
              vqax_raw["coco"][0], "--out", str(tmp_path / "o3")])


def test_help_names_the_fields_read(capsys):
    for cmd, words in (("vqax", ["question_id", "multiple_choice_answer", "answer_type", "image_name", "explanation",
                                 "--answer-types", "--min-count", "--max-classes", "--classes"]),
                       ("actx", ["img_id,iid,image_name", "ans,answers", "exp,explanation", "--min-count"])):
        with pytest.raises(SystemExit) as exit_:  # in-process: a subprocess per call cost 9 s of torch imports
            convert.build_parser().parse_args([cmd, "--help"])
        assert exit_.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        for w in words:
            assert w in text, (cmd, w)

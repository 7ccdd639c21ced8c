"""A dataset from elsewhere is not trusted: paths leaving its root, duplicate ids, stray class ids and classes
without training images are refused or reported."""
import json
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from megl.data import DataError, DataWarning, load_splits


def _png(path: Path, k: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((16, 16, 3), 30 * k % 255, np.uint8)
    arr[:, :5, k % 3] = 250
    Image.fromarray(arr).save(path)


def _mask(path: Path) -> None:
    m = np.zeros((16, 16), np.float32)
    m[4:9, 4:9] = 1
    np.save(path, m)


def _dataset(root: Path, items: dict, text: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, (ident, it) in enumerate(items.items()):
        if it.get("image_path", "").startswith("images/"):
            _png(root / it["image_path"], i)
    (root / "exp_annotation.json").write_text(text if text is not None else json.dumps(items))
    return root


def _item(k, image, split="train", vis="", ans=None):
    return {"class_id": k, "ans": ans or f"c{k}", "image_path": image, "visual_exp": vis, "exp": ["why"],
            "split": split}


def _load(root, **kw):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always", DataWarning)
        sp = load_splits(root, image_size=16, val_fraction=0.0, **kw)
    return sp, "\n".join(str(x.message) for x in w)


@pytest.fixture
def outside(tmp_path):
    """Files outside the dataset root: what a hostile exp_annotation.json would point at."""
    _png(tmp_path / "private" / "secret.png", 7)
    _mask(tmp_path / "private" / "secret.npy")
    return tmp_path / "private"


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_paths_leaving_the_root_are_refused_unless_allowed(tmp_path, outside, how):
    root = tmp_path / "ds"
    img = str(outside / "secret.png") if how == "absolute" else "../private/secret.png"
    vis = str(outside / "secret.npy") if how == "absolute" else "../private/secret.npy"
    _mask_dir = root / "masks"
    _mask_dir.mkdir(parents=True)
    _mask(_mask_dir / "ok.npy")
    items = {"a": _item(0, "images/a.png", vis="masks/ok.npy"), "b": _item(1, "images/b.png", vis=vis),
             "c": _item(1, img), "t": _item(0, "images/t.png", "test"), "u": _item(1, "images/u.png", "test")}
    _dataset(root, items)
    sp, warned = _load(root)
    assert [r.id for r in sp["train"].records] == ["a", "b"]  # "c" skipped: its image is outside
    assert sp["train"].has_masks.tolist() == [True, False]  # b keeps its image, not the outside mask
    report = sp["train"].report
    assert report.skip_counts() == {"path outside the dataset": 1}
    assert report.mask_drop_counts() == {"path outside the dataset": 1}
    assert "allow_external_paths" in warned
    with pytest.raises(DataError, match="outside the dataset.*allow_external_paths"):
        load_splits(root, image_size=16, val_fraction=0.0, strict=True)
    sp, _ = _load(root, allow_external_paths=True)
    assert [r.id for r in sp["train"].records] == ["a", "b", "c"]
    assert sp["train"].has_masks.tolist() == [True, True, False]


def test_the_config_flag_reaches_the_loader(tmp_path, outside):
    from megl.config import Config
    from megl.runs import make_splits

    root = _dataset(tmp_path / "ds", {"a": _item(0, "images/a.png"), "c": _item(1, str(outside / "secret.png")),
                                      "t": _item(1, "images/t.png", "test")})
    with pytest.warns(DataWarning):
        assert make_splits(Config(data_root=str(root), image_size=16))["train"].num_images == 1
    with pytest.warns(DataWarning):  # (no val item: carved from train, a note)
        assert make_splits(Config(data_root=str(root), image_size=16,
                                  allow_external_paths=True))["train"].num_images == 2


def test_symlinked_images_inside_the_root_still_load(tmp_path, outside):
    root = _dataset(tmp_path / "ds", {"a": _item(0, "images/a.png"), "t": _item(0, "images/t.png", "test")})
    os.symlink(outside / "secret.png", root / "images" / "linked.png")  # what convert --link writes
    (root / "exp_annotation.json").write_text(json.dumps({"a": _item(0, "images/a.png"),
                                                          "l": _item(0, "images/linked.png"),
                                                          "t": _item(0, "images/t.png", "test")}))
    sp, _ = _load(root)
    assert sp["train"].num_images == 2


def test_duplicate_ids_in_the_json_are_reported(tmp_path):
    a, b, t = (json.dumps(x) for x in (_item(0, "images/a.png"), _item(1, "images/b.png"), _item(0, "images/t.png",
                                                                                                      "test")))
    root = _dataset(tmp_path / "ds", {"x": _item(0, "images/a.png"), "y": _item(1, "images/b.png"),
                                      "t": _item(0, "images/t.png", "test")},
                    text=f'{{"x": {a}, "x": {b}, "t": {t}}}')
    sp, warned = _load(root)
    assert sp["train"].report.skip_counts() == {"duplicate id": 1} and "duplicate id" in warned
    with pytest.raises(DataError, match="'x': duplicate id"):
        load_splits(root, image_size=16, val_fraction=0.0, strict=True)


def test_a_stray_class_id_and_a_class_without_training_images_are_reported(tmp_path):
    items = {"a": _item(0, "images/a.png"), "b": _item(1, "images/b.png"), "s": _item(9, "images/s.png", "test"),
             "t": _item(2, "images/t.png", "test")}
    sp, warned = _load(_dataset(tmp_path / "ds", items))
    assert sp["train"].num_classes == 10
    assert "class ids [3, 4, 5, 6, 7, 8] have no item" in warned and "stray class_id" in warned
    assert "8 of 10 classes have no training image: c2, class_3" in warned


def test_training_overlays_stay_inside_the_run(tmp_path):
    from megl.data import ExplanationDataset, ImageRecord
    from megl.train import write_overlays

    records = [ImageRecord(id=i, label=0, references=["r"]) for i in ("../../escape", "a/b", "ok")]
    ds = ExplanationDataset(records, ["c"], 8, images=torch.zeros(3, 3, 8, 8, dtype=torch.uint8))
    model = SimpleNamespace(classifier=SimpleNamespace(has_gradcam=True),
                            explain=lambda x: (None, SimpleNamespace(saliency=torch.rand(x.shape[0], 8, 8))))
    write_overlays(model, ds, tmp_path / "run", 3, "cpu")
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png"))
    assert len(written) == 3 and all(p.parts[:2] == ("run", "overlays") and len(p.parts) == 3 for p in written)
    assert Path("run/overlays/ok.png") in written


def test_a_dataset_with_no_usable_item_is_one_line(tmp_path, outside):
    from megl.train import main

    root = _dataset(tmp_path / "ds", {"a": _item(0, str(outside / "secret.png")), "b": _item(1, "images/none.png")})
    (root / "images" / "none.png").unlink(missing_ok=True)
    with pytest.raises(SystemExit, match=r"^megl.train: error: no usable item .*path outside the dataset: 1") as e:
        main(["--data-root", str(root), "--out", str(tmp_path / "run"), "--no-progress"])
    assert "\n" not in str(e.value)

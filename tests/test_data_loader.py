"""megl.data.load_splits on the on-disk format: round trip, masks, classes, splits, bad data, prior, transforms."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from megl.data import (DataError, DataWarning, collate, load_splits, mean_mask_prior, read_mask, resize, resize_mask,
                       statistics)
from megl.data import synthetic as sy

CFG = sy.SyntheticConfig(n_train=40, n_val=12, n_test=12, seed=5)


@pytest.fixture(scope="module")
def synth():
    return sy.make_splits(CFG)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory, synth):
    return sy.write_dataset(synth, tmp_path_factory.mktemp("synth"))


# ----------------------------------------------------------------------------- fixture builder for hand-made sets
def make_root(tmp_path, items, *, size=(40, 60), classes=None):
    """Write images for every item (coloured rectangles, HxW = size) and the annotation json.

    items: {id: dict}; an item's "_mask" (np.ndarray) is saved as masks/<id>.npy and referenced by visual_exp."""
    (tmp_path / "images").mkdir(parents=True, exist_ok=True)
    (tmp_path / "masks").mkdir(exist_ok=True)
    ann = {}
    for k, (ident, it) in enumerate(items.items()):
        if not isinstance(it, dict):  # malformed entries are written as they are
            ann[ident] = it
            continue
        it = dict(it)
        if "image_path" not in it:
            it["image_path"] = f"raw/{ident}.png"
        name = it["image_path"].split("/")[-1]
        if it.pop("_write_image", True):
            arr = np.zeros((*size, 3), np.uint8)
            arr[..., k % 3] = 200
            arr[: size[0] // 2, : size[1] // 2] = 30
            Image.fromarray(arr).save(tmp_path / "images" / name)
        if "_mask" in it:
            np.save(tmp_path / "masks" / f"{ident}.npy", it.pop("_mask"))
            it.setdefault("visual_exp", f"masks/{ident}.npy")
        it.setdefault("visual_exp", "")
        it.setdefault("exp", [f"because of thing {k}"])
        ann[ident] = it
    (tmp_path / "exp_annotation.json").write_text(json.dumps(ann))
    if classes is not None:
        (tmp_path / "classes.json").write_text(json.dumps(classes))
    return tmp_path


def box_mask(size=(40, 60)):
    m = np.zeros(size, np.float32)
    m[size[0] // 8: size[0] // 2, size[1] // 6: size[1] // 2] = 1.0
    return m


def basic_items(n=12, n_classes=3, mask_every=3, size=(40, 60)):
    names = ["cat", "dog", "bird", "fish"][:n_classes]
    items = {}
    for i in range(n):
        c = i % n_classes
        it = {"class_id": c, "ans": names[c]}
        if i % mask_every == 0:
            it["_mask"] = box_mask(size)
        items[f"q{i}"] = it
    return items


def load_quiet(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return load_splits(*args, **kw)


# ----------------------------------------------------------------------------- round trip
def test_round_trip_synthetic_disk_loader(synth, synth_root):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # a clean dataset loads without any warning
        loaded = load_splits(synth_root, image_size=CFG.image_size)
    assert loaded["train"].report.clean and loaded["train"].report.loaded == 64
    for s in ("train", "val", "test"):
        a, b = synth[s], loaded[s]
        assert b.class_names == a.class_names and b.image_size == a.image_size
        assert len(a) == len(b) and a.num_images == b.num_images
        for k in range(len(a)):
            x, y = a[k], b[k]
            assert x["id"] == y["id"] and x["label"] == y["label"] and x["has_mask"] == y["has_mask"]
            assert x["rationale"] == y["rationale"] and x["references"] == y["references"]
            assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
    assert statistics(loaded) == statistics(synth)
    assert torch.equal(mean_mask_prior(loaded["train"]), mean_mask_prior(synth["train"]))
    # the written masks are binary uint8 files
    some = next(p for p in (synth_root / "masks").iterdir())
    assert np.load(some).dtype == np.uint8


def test_synthetic_cli_writes_a_loadable_dataset(tmp_path, capsys):
    args = ["--n-train", "12", "--n-val", "4", "--n-test", "4", "--num-classes", "9", "--mask-fraction", "0.5"]
    assert sy.main(args + ["--out", str(tmp_path / "d")]) == 0
    assert "| **synthetic** | 20 | 20 | 14 | 9 |" in capsys.readouterr().out
    sp = load_splits(tmp_path / "d", image_size=64)
    assert sp["train"].num_images == 12 and sp["train"].num_classes == 9 and int(sp["train"].has_masks.sum()) == 6
    with pytest.raises(FileExistsError, match="overwrite"):
        sy.main(args + ["--out", str(tmp_path / "d")])


def test_masks_are_resized_with_their_image(synth, synth_root):
    small = load_splits(synth_root, image_size=32)
    a, b = synth["val"], small["val"]
    for i in range(4):
        img = resize(a.image(i), 32)
        assert (b.image(i) - img).abs().max() <= 0.5 / 255 + 1e-6  # uint8 rounding only
        assert torch.allclose(b.mask(i), resize_mask(a.mask(i), 32), atol=1e-3)  # float16 storage
        # the mask still sits on the object after resizing
        ys, xs = torch.nonzero(b.mask(i) > 0.5, as_tuple=True)
        cx, cy = a.records[i].meta["center"]
        assert abs(xs.float().mean() * 2 - cx) < 6 and abs(ys.float().mean() * 2 - cy) < 6


def test_lazy_images_equal_cached(synth_root):
    cached = load_splits(synth_root, image_size=48, cache_images=True)
    lazy = load_splits(synth_root, image_size=48, cache_images=False)
    assert lazy["val"]._images is None and cached["val"]._images is not None
    for k in range(5):
        assert torch.equal(cached["val"][k]["image"], lazy["val"][k]["image"])


# ----------------------------------------------------------------------------- masks
def test_annotators_are_averaged_and_min_max_normalised(tmp_path):
    k = np.zeros((3, 40, 60), np.uint8)
    k[0, 0:10] = 255
    k[1, 0:20] = 255
    k[2, 0:20] = 51
    items = {"a": {"class_id": 0, "ans": "x", "_mask": k}, "b": {"class_id": 0, "ans": "x"}}
    root = make_root(tmp_path, items)
    m = read_mask(root / "masks" / "a.npy", (40, 60))
    mean = k.astype(np.float32).mean(0)
    expect = (mean - mean.min()) / (mean.max() - mean.min())
    assert m.shape == (40, 60) and m.dtype == np.float32
    np.testing.assert_allclose(m, expect, atol=1e-6)
    assert m.max() == 1.0 and m.min() == 0.0
    sp = load_quiet(root, image_size=40, val_fraction=0.0, test_fraction=0.0)
    tr = sp["train"].expanded(False)
    got = tr.mask([r.id for r in tr.records].index("a"))
    assert torch.allclose(got, resize_mask(torch.from_numpy(expect), 40), atol=2e-3)


def test_mask_at_other_resolution_with_same_aspect_is_accepted(tmp_path):
    m = np.zeros((20, 30), np.float32)
    m[2:10, 5:15] = 0.7
    root = make_root(tmp_path, {"a": {"class_id": 0, "ans": "x", "_mask": m}})
    sp = load_splits(root, image_size=30, val_fraction=0, test_fraction=0)
    assert sp["train"].records[0].has_mask and float(sp["train"].mask(0).max()) == pytest.approx(1.0, abs=1e-3)


# ----------------------------------------------------------------------------- classes
def test_class_vocabulary_from_class_id_and_ans(tmp_path):
    root = make_root(tmp_path, basic_items(n=9))
    sp = load_splits(root, image_size=16, val_fraction=0, test_fraction=0)
    assert sp["train"].class_names == ["cat", "dog", "bird"] and sp["train"].num_classes == 3


def test_class_vocabulary_from_ans_only(tmp_path):
    items = {f"i{k}": {"ans": a} for k, a in enumerate(["zebra", "ant", "zebra", "moth"])}
    root = make_root(tmp_path, items)
    sp = load_quiet(root, image_size=16, val_fraction=0, test_fraction=0)
    assert sp["train"].class_names == ["ant", "moth", "zebra"]
    labels = {r.id: r.label for r in sp["train"].records}
    assert labels == {"i0": 2, "i1": 0, "i2": 2, "i3": 1}
    assert any("sorted ans" in n for n in sp["train"].report.notes)


def test_class_id_out_of_range_with_class_list(tmp_path):
    items = basic_items(n=6)
    items["bad"] = {"class_id": 7, "ans": "cat"}
    items["neg"] = {"class_id": -1, "ans": "cat"}
    root = make_root(tmp_path, items, classes=["cat", "dog", "bird"])
    with pytest.warns(DataWarning, match="class_id out of range: 2"):
        sp = load_splits(root, image_size=16, val_fraction=0, test_fraction=0)
    rep = sp["train"].report
    assert rep.skip_counts() == {"class_id out of range": 2} and rep.loaded == 6
    assert {i for i, *_ in rep.skipped} == {"bad", "neg"}


def test_class_id_inconsistent_with_ans(tmp_path):
    items = basic_items(n=9)
    items["x1"] = {"class_id": 0, "ans": "dog"}   # id 0 is "cat" elsewhere
    items["x2"] = {"class_id": 1, "ans": "cat"}   # "cat" is id 0 elsewhere
    root = make_root(tmp_path, items)
    with pytest.warns(DataWarning, match="inconsistent"):
        sp = load_splits(root, image_size=16, val_fraction=0, test_fraction=0)
    rep = sp["train"].report
    assert rep.skip_counts() == {"class_id inconsistent with ans": 2}
    assert sp["train"].class_names == ["cat", "dog", "bird"] and sp["train"].num_images == 9
    # with a class list the check is against the list
    root2 = make_root(tmp_path / "b", {"a": {"class_id": 0, "ans": "cat"}, "b": {"class_id": 1, "ans": "cat"}},
                      classes=["cat", "dog"])
    rep2 = load_quiet(root2, image_size=16, val_fraction=0, test_fraction=0)["train"].report
    assert rep2.skip_counts() == {"class_id inconsistent with ans": 1}


# ----------------------------------------------------------------------------- splits
def test_seeded_stratified_split_when_no_split_key(tmp_path):
    root = make_root(tmp_path, basic_items(n=60, n_classes=3, size=(8, 8)), size=(8, 8))
    a = load_splits(root, image_size=8, seed=1, val_fraction=0.2, test_fraction=0.2)
    b = load_splits(root, image_size=8, seed=1, val_fraction=0.2, test_fraction=0.2)
    c = load_splits(root, image_size=8, seed=2, val_fraction=0.2, test_fraction=0.2)
    ids = {s: [r.id for r in a[s].records] for s in a}
    assert ids == {s: [r.id for r in b[s].records] for s in b}
    assert ids != {s: [r.id for r in c[s].records] for s in c}
    assert [len(ids[s]) for s in ("train", "val", "test")] == [36, 12, 12]
    assert sorted(sum(ids.values(), [])) == sorted(f"q{i}" for i in range(60))  # a partition
    for s in ("train", "val", "test"):  # stratified: 20 per class -> 12 / 4 / 4
        assert torch.bincount(a[s].labels, minlength=3).tolist() == ([12] * 3 if s == "train" else [4] * 3)


def test_split_key_is_honoured_and_val_carved_when_absent(tmp_path):
    items = basic_items(n=30, n_classes=3, size=(8, 8))
    for i, it in enumerate(items.values()):
        it["split"] = "test" if i < 6 else "train"
    root = make_root(tmp_path, items, size=(8, 8))
    with pytest.warns(DataWarning, match="carved"):
        sp = load_splits(root, image_size=8, val_fraction=0.1, test_fraction=0.2)
    assert [r.id for r in sp["test"].records] == [f"q{i}" for i in range(6)]
    assert sp["val"].num_images > 0 and sp["train"].num_images + sp["val"].num_images == 24
    items["q7"]["split"] = "holdout"
    root = make_root(tmp_path / "bad", items, size=(8, 8))
    with pytest.warns(DataWarning, match="bad split"):
        sp = load_splits(root, image_size=8, val_fraction=0.0)
    assert sp["train"].report.skip_counts() == {"bad split": 1}


def test_items_without_split_key_among_items_with_one(tmp_path):
    items = basic_items(n=30, n_classes=3, size=(8, 8))
    for i, it in enumerate(items.values()):
        if i < 10:
            it["split"] = "val"
    root = make_root(tmp_path, items, size=(8, 8))
    with pytest.warns(DataWarning, match="without a split key"):
        sp = load_splits(root, image_size=8, val_fraction=0.0, test_fraction=0.25)
    assert {f"q{i}" for i in range(10)} <= {r.id for r in sp["val"].records}
    assert sp["test"].num_images == 6  # 25 % of each class's remaining items


# ----------------------------------------------------------------------------- bad data
def test_bad_items_are_counted_skips_and_never_crash_an_epoch(tmp_path):
    items = basic_items(n=12)
    items["no_img"] = {"class_id": 0, "ans": "cat", "image_path": "images/nowhere.jpg", "_write_image": False}
    items["garbage"] = {"class_id": 1, "ans": "dog", "image_path": "images/garbage.png", "_write_image": False}
    items["no_text"] = {"class_id": 0, "ans": "cat", "exp": []}
    items["text_wrong"] = {"class_id": 0, "ans": "cat", "exp": [3, None]}
    items["not_dict"] = ["cat"]
    items["miss_mask"] = {"class_id": 0, "ans": "cat", "visual_exp": "masks/missing.npy"}
    items["bad_npy"] = {"class_id": 1, "ans": "dog", "visual_exp": "masks/bad_npy.npy"}
    items["nan_mask"] = {"class_id": 1, "ans": "dog", "_mask": np.full((40, 60), np.nan, np.float32)}
    items["4d_mask"] = {"class_id": 2, "ans": "bird", "_mask": np.ones((1, 2, 40, 60), np.float32)}
    items["shape_mask"] = {"class_id": 2, "ans": "bird", "_mask": box_mask((60, 40))}
    items["flat_mask"] = {"class_id": 2, "ans": "bird", "_mask": np.zeros((40, 60), np.uint8)}
    items["obj_mask"] = {"class_id": 2, "ans": "bird", "_mask": np.array([{"a": 1}] * 4, dtype=object)}
    root = make_root(tmp_path, items)
    (root / "images" / "garbage.png").write_bytes(b"this is not a png")
    (root / "masks" / "bad_npy.npy").write_text("not numpy")
    with pytest.warns(DataWarning) as rec:
        sp = load_splits(root, image_size=24, val_fraction=0.0, test_fraction=0.0)
    rep = sp["train"].report
    assert rep.skip_counts() == {"missing image": 1, "unreadable image": 1, "no rationale": 2, "not an object": 1}
    assert rep.mask_drop_counts() == {"missing mask": 1, "malformed mask": 4, "mask shape mismatch": 1,
                                      "constant mask": 1}
    assert rep.total == 24 and rep.loaded == 19
    summary = str(rec[0].message)
    assert "skipped items: 5" in summary and "dropped masks (item kept): 7" in summary and "nowhere.jpg" in summary
    assert "different aspect ratio" in summary
    ds = sp["train"]
    dropped = {i for i, *_ in rep.masks_dropped}
    for i, r in enumerate(ds.records):
        assert r.has_mask == (r.id in {"q0", "q3", "q6", "q9"}), r.id
        if r.id in dropped:
            assert ds.mask(i).abs().sum() == 0
    # a full epoch through a DataLoader works
    n = sum(b["image"].shape[0] for b in torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=collate))
    assert n == len(ds) == 19


def test_strict_mode_raises_at_the_first_problem(tmp_path):
    items = basic_items(n=6)
    items["no_img"] = {"class_id": 0, "ans": "cat", "image_path": "images/nowhere.jpg", "_write_image": False}
    root = make_root(tmp_path, items)
    with pytest.raises(DataError, match="'no_img': missing image"):
        load_splits(root, image_size=16, strict=True)


@pytest.mark.parametrize("content, match", [
    ("{}", "holds no items"), ("[]", "holds no items"), ("{\"a\": 1,,}", "not valid JSON \\(line 1"),
    ("42", "must hold an object"),
])
def test_empty_or_malformed_annotation_file(tmp_path, content, match):
    (tmp_path / "exp_annotation.json").write_text(content)
    with pytest.raises(DataError, match=match):
        load_splits(tmp_path)


def test_missing_root_or_annotation(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load_splits(tmp_path / "nope")
    with pytest.raises(DataError, match="python -m megl.data.convert"):
        load_splits(tmp_path)


def test_all_items_bad_is_an_error_with_the_summary(tmp_path):
    items = {f"i{k}": {"class_id": 0, "ans": "cat", "image_path": f"images/none{k}.jpg", "_write_image": False}
             for k in range(3)}
    root = make_root(tmp_path, items)
    with pytest.raises(DataError, match="no usable item(.|\n)*missing image: 3"):
        load_splits(root)


def test_empty_train_split_is_an_error(tmp_path):
    items = basic_items(n=6)
    for it in items.values():
        it["split"] = "test"
    root = make_root(tmp_path, items)
    with pytest.raises(DataError, match="training split .* is empty"):
        load_splits(root, image_size=16)


def test_bad_classes_file(tmp_path):
    root = make_root(tmp_path, basic_items(n=3), classes=["cat", "cat"])
    with pytest.raises(DataError, match="twice"):
        load_splits(root)


# ----------------------------------------------------------------------------- prior
def test_mean_mask_prior(synth):
    tr = synth["train"]
    prior = mean_mask_prior(tr)
    idx = [i for i, r in enumerate(tr.records) if r.has_mask]
    assert len(idx) == 4
    expect = torch.stack([tr.mask(i) for i in idx]).mean(0)
    assert prior.shape == (64, 64) and prior.dtype == torch.float32
    assert torch.allclose(prior, expect)
    assert torch.equal(mean_mask_prior(tr.expanded(False)), prior)  # per image, not per rationale


def test_prior_without_any_training_mask(tmp_path):
    cfg = sy.SyntheticConfig(n_train=10, n_val=2, n_test=2, mask_fraction=0.0)
    tr = sy.make_splits(cfg)["train"]
    with pytest.raises(DataError, match="no image with a visual explanation.*on_missing='uniform'"):
        mean_mask_prior(tr)
    with pytest.warns(DataWarning, match="uniform prior"):
        p = mean_mask_prior(tr, on_missing="uniform")
    assert p.shape == (64, 64) and torch.all(p == p[0, 0]) and p[0, 0] > 0
    with pytest.raises(ValueError, match="on_missing"):
        mean_mask_prior(tr, on_missing="zeros")

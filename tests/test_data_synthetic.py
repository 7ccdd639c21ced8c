"""megl.data.synthetic: determinism, masks, decoy, rationales, the item / batch contract."""
import re
import time

import numpy as np
import pytest
import torch

from megl.data import collate, format_statistics, statistics
from megl.data import synthetic as sy


_GEN_SECONDS = []


@pytest.fixture(scope="module")
def default_splits():
    t = time.process_time()
    splits = sy.make_splits(sy.SyntheticConfig())
    _GEN_SECONDS.append(time.process_time() - t)
    return splits


def _px(ds, i):
    return (ds.image(i).permute(1, 2, 0).numpy() * 255).round()


def test_default_config_and_statistics(default_splits):
    cfg = sy.SyntheticConfig()
    assert (cfg.n_train, cfg.n_val, cfg.n_test, cfg.image_size) == (1200, 300, 300, 64)
    assert cfg.num_classes >= 8 and cfg.mask_fraction == 0.1 and cfg.decoy_strength == 0.9
    st = statistics(default_splits)
    assert st["samples"] == 1800 and st["textual"] == 1800 and st["classes"] == cfg.num_classes
    assert st["per_split"]["train"]["visual"] == 120  # exactly round(0.1 * 1200)
    assert st["per_split"]["val"]["visual"] == 300 and st["per_split"]["test"]["visual"] == 300
    assert st["visual"] == 720
    table = format_statistics(st, "synthetic")
    assert "| **synthetic** | 1,800 | 1,800 | 720 | 8 |" in table
    # every class present in every split, roughly balanced
    for ds in default_splits.values():
        counts = torch.bincount(ds.labels, minlength=cfg.num_classes)
        assert counts.min() >= len(ds.records) // cfg.num_classes - 1


def test_default_generation_is_fast(default_splits):
    assert _GEN_SECONDS and _GEN_SECONDS[0] < 5.0  # ~1.5-2 s CPU on one core; the bound allows a busy machine


def test_deterministic_and_seed_dependent():
    cfg = sy.SyntheticConfig(n_train=24, n_val=8, n_test=8, seed=3)
    a, b = sy.make_splits(cfg), sy.make_splits(cfg)
    c = sy.make_splits(sy.SyntheticConfig(n_train=24, n_val=8, n_test=8, seed=4))
    for s in ("train", "val", "test"):
        assert torch.equal(a[s]._images, b[s]._images)
        assert [r.references for r in a[s].records] == [r.references for r in b[s].records]
        assert torch.equal(a[s].labels, b[s].labels) and torch.equal(a[s].has_masks, b[s].has_masks)
        assert all(torch.equal(a[s].mask(i), b[s].mask(i)) for i in range(a[s].num_images))
        assert not torch.equal(a[s]._images, c[s]._images)
    # splits are different images, not copies
    assert not torch.equal(a["val"]._images, a["test"]._images)


def test_masks_cover_the_object_and_not_the_decoy(default_splits):
    ds = default_splits["val"]
    cfg = sy.SyntheticConfig()
    x0, y0, x1, y1 = sy.decoy_box(cfg)
    for i in range(60):
        r = ds.records[i]
        m = ds.mask(i).numpy()
        assert set(np.unique(m)) == {0.0, 1.0}
        assert m[y0:y1, x0:x1].sum() == 0, "mask touches the decoy patch"
        assert m.sum() == r.meta["silhouette_area"] > 40
        px = _px(ds, i)
        nominal = np.array(sy.COLOURS[r.meta["colour"]], dtype=np.float64)
        near = np.linalg.norm(px - nominal, axis=-1) < 45
        inside = m > 0.5
        assert near[inside].mean() > 0.97, "mask pixels are not the object's colour"
        outside = ~inside
        outside[y0:y1, x0:x1] = False
        assert near[outside].sum() <= 3, "object-coloured pixels outside the mask"


def test_labels_rationales_and_positions_agree(default_splits):
    colours, shapes = set(sy.COLOURS), set(sy.SHAPES)
    phrase_cell = {p: (r, c) for r, row in enumerate(sy.WHERE) for c, p in enumerate(row)}
    for split, ds in default_splits.items():
        for i, r in enumerate(ds.records[:200]):
            colour, shape = ds.class_names[r.label].split()
            assert (shape, colour) == sy.CLASSES[r.label] == (r.meta["shape"], r.meta["colour"])
            assert 1 <= len(r.references) <= 3 and len(set(r.references)) == len(r.references)
            for text in r.references:
                words = set(re.findall(r"[a-z]+", text))
                assert colour in words and shape in words, text
                assert not (words & colours) - {colour} and not (words & shapes) - {shape}, text
                assert "corner patch" not in text and "decoy" not in text
                (phrase,) = [p for p in phrase_cell if p in text]
                row, col = phrase_cell[phrase]
                cx, cy = r.meta["center"]
                S = ds.image_size
                assert col * S / 3 <= cx < (col + 1) * S / 3 and row * S / 3 <= cy < (row + 1) * S / 3
    # the silhouette's centre (val: all masked) lies in the named cell, within a few pixels
    ds = default_splits["val"]
    for i, r in enumerate(ds.records[:100]):
        ys, xs = np.nonzero(ds.mask(i).numpy())
        cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
        (phrase,) = [p for p in phrase_cell if p in r.references[0]]
        row, col = phrase_cell[phrase]
        assert col * 64 / 3 - 3 <= cx <= (col + 1) * 64 / 3 + 3 and row * 64 / 3 - 3 <= cy <= (row + 1) * 64 / 3 + 3
    counts = {len(r.references) for r in default_splits["train"].records}
    assert counts == {1, 2, 3}
    texts = [t for r in default_splits["train"].records for t in r.references]
    assert len(set(texts)) > 0.3 * len(texts)  # varied, so text metrics are not trivially perfect


def _decoy_predictions(ds, cfg):
    """Read the corner patch's colour and map it to the class with the nearest decoy colour."""
    x0, y0, x1, y1 = sy.decoy_box(cfg)
    pal = sy.decoy_palette(cfg.num_classes).astype(np.float64)
    imgs = ds._images[:, :, y0:y1, x0:x1].double().mean(dim=(2, 3)).numpy()  # (N, 3)
    return np.linalg.norm(imgs[:, None, :] - pal[None], axis=-1).argmin(1)


def test_decoy_predicts_train_labels_but_not_test(default_splits):
    cfg = sy.SyntheticConfig()
    for split in ("train", "val", "test"):
        ds = default_splits[split]
        pred = _decoy_predictions(ds, cfg)
        assert (pred == np.array([r.meta["decoy_class"] for r in ds.records])).all(), "palette not decodable"
    train = (_decoy_predictions(default_splits["train"], cfg) == default_splits["train"].labels.numpy()).mean()
    test = (_decoy_predictions(default_splits["test"], cfg) == default_splits["test"].labels.numpy()).mean()
    val = (_decoy_predictions(default_splits["val"], cfg) == default_splits["val"].labels.numpy()).mean()
    # P(match) = 0.9 + 0.1 / 8 in training; 1/8 (chance) in val and test
    assert 0.88 <= train <= 0.95
    assert test <= 0.22 and val <= 0.22
    assert train - test > 0.6  # a decoy reader loses most of its accuracy on test


def test_decoy_strength_is_a_parameter():
    cfg = sy.SyntheticConfig(n_train=400, n_val=1, n_test=1, decoy_strength=0.0)
    ds = sy.make_splits(cfg)["train"]
    acc = (_decoy_predictions(ds, cfg) == ds.labels.numpy()).mean()
    assert acc < 0.25
    cfg1 = sy.SyntheticConfig(n_train=200, n_val=1, n_test=1, decoy_strength=1.0, decoy_corner="bottom_right")
    ds1 = sy.make_splits(cfg1)["train"]
    assert (_decoy_predictions(ds1, cfg1) == ds1.labels.numpy()).all()


def test_sizes_classes_and_mask_fraction_are_parameters():
    cfg = sy.SyntheticConfig(n_train=50, n_val=7, n_test=5, image_size=48, num_classes=12, mask_fraction=0.3, seed=1)
    sp = sy.make_splits(cfg)
    assert [sp[s].num_images for s in ("train", "val", "test")] == [50, 7, 5]
    assert sp["train"].has_masks.sum() == 15 and sp["val"].has_masks.all() and sp["test"].has_masks.all()
    assert sp["train"].num_classes == 12 and "green circle" in sp["train"].class_names
    assert sp["val"][0]["image"].shape == (3, 48, 48)
    for i, r in enumerate(sp["train"].records):
        if not r.has_mask:
            assert sp["train"].mask(i).abs().sum() == 0


@pytest.mark.parametrize("kw, word", [
    ({"num_classes": 1}, "num_classes"), ({"num_classes": 99}, "num_classes"), ({"mask_fraction": 1.5}, "mask_fraction"),
    ({"decoy_strength": -0.1}, "decoy_strength"), ({"image_size": 16}, "image_size"), ({"n_train": 0}, "sizes"),
    ({"decoy_corner": "middle"}, "decoy_corner"), ({"min_object_size": 0.3}, "object sizes"),
])
def test_config_validation(kw, word):
    with pytest.raises(ValueError, match=word):
        sy.SyntheticConfig(**kw)


def test_items_and_collate_follow_the_batch_contract():
    sp = sy.make_splits(sy.SyntheticConfig(n_train=16, n_val=6, n_test=6))
    train, val = sp["train"], sp["val"]
    assert train.expand_rationales and not val.expand_rationales
    assert len(train) == sum(len(r.references) for r in train.records) > train.num_images
    assert len(val) == val.num_images
    flat = [(it["id"], it["rationale"]) for it in (train[k] for k in range(len(train)))]
    assert flat == [(r.id, t) for r in train.records for t in r.references]
    for k in range(len(val)):
        it = val[k]
        assert it["rationale"] == it["references"][0] == val.records[k].references[0]
    assert len(train.expanded(False)) == train.num_images and len(val.expanded(True)) > len(val)
    batch = collate([train[k] for k in range(5)])
    assert set(batch) == {"image", "label", "mask", "has_mask", "rationale", "references", "id"}
    assert batch["image"].shape == (5, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (5,)
    assert batch["mask"].shape == (5, 64, 64) and batch["mask"].dtype == torch.float32
    assert batch["has_mask"].dtype == torch.bool and batch["has_mask"].shape == (5,)
    assert isinstance(batch["rationale"][0], str) and isinstance(batch["references"][0], list)
    assert batch["id"] == [train[k]["id"] for k in range(5)]
    loader = torch.utils.data.DataLoader(val, batch_size=4, collate_fn=collate)
    assert sum(b["image"].shape[0] for b in loader) == len(val)
    with pytest.raises(ValueError, match="empty"):
        collate([])
    with pytest.raises(KeyError, match="lack keys"):
        collate([{"image": torch.zeros(3, 2, 2)}])


def test_preview_grid_writes_a_png(tmp_path):
    from PIL import Image

    from megl.data.preview import main, preview_grid

    sp = sy.make_splits(sy.SyntheticConfig(n_train=20, n_val=4, n_test=4))
    out = preview_grid(sp["train"], tmp_path / "g.png", n=6, cols=3, scale=1)
    with Image.open(out) as im:
        assert im.size == (3 * 68 + 4, 2 * (2 * 64 + 16) + 4)
        arr = np.asarray(im.convert("RGB"))
    assert arr.std() > 10  # not blank
    assert main(["--out", str(tmp_path / "cli.png"), "--n", "4"]) == 0 and (tmp_path / "cli.png").stat().st_size > 0
    with pytest.raises(ValueError, match="no image"):
        preview_grid(sp["train"].expanded(False), tmp_path / "x.png", masked_only=True, start=10_000)

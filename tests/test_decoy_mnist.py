"""DecoyMNIST: IDX reading, the swatch construction per split, both mask conventions, and the converter CLI on tiny
IDX files written here."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from megl.data import load_splits
from megl.data import mnist as mn
from megl.data.convert import main as convert

N_TRAIN, N_TEST = 40, 12


def idx_bytes(arr: np.ndarray) -> bytes:
    magic = 2051 if arr.ndim == 3 else 2049
    head = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def digits(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Fake digits: a bright blob in the middle (no ink within 6 px of the border), labels 0-9 cycling."""
    x = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        r, c = rng.integers(9, 15, size=2)
        x[i, r:r + 5, c:c + 4] = 200
    return x, np.arange(n) % 10


def write_mnist(root, gz=True, layout=""):
    rng = np.random.default_rng(0)
    d = root / layout if layout else root
    d.mkdir(parents=True, exist_ok=True)
    for part, n in (("train", N_TRAIN), ("test", N_TEST)):
        x, y = digits(n, rng)
        for stem, arr in zip(mn.FILES[part], (x, y)):
            data = idx_bytes(arr)
            if gz:
                with gzip.open(d / (stem + ".gz"), "wb") as f:
                    f.write(data)
            else:
                (d / stem).write_bytes(data)
    return root


def run(tmp_path, *extra, mnist=None):
    out = tmp_path / "out"
    convert(["decoy-mnist", "--mnist", str(mnist or write_mnist(tmp_path / "mnist")), "--out", str(out),
             "--n-train", "20", "--n-val", "8", "--n-test", "10", *extra])
    return out, json.loads((out / "exp_annotation.json").read_text())


def read_png(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def test_swatch_corner_and_shade_follow_the_label_in_train_val_and_are_random_in_test(tmp_path):
    out, ann = run(tmp_path)
    assert {s: sum(it["split"] == s for it in ann.values()) for s in ("train", "val", "test")} == \
        {"train": 20, "val": 8, "test": 10}
    test_shades_off_label = 0
    for ident, it in ann.items():
        img = read_png(out / it["image_path"])
        k = mn.CORNERS.index(it["decoy"]["corner"])
        rows, cols = mn.corner_slices(k, 4, img.shape)
        shade = it["decoy"]["shade"]
        assert (img[rows, cols] == shade).all()
        for other in set(range(4)) - {k}:  # the other corners stay background
            assert (img[mn.corner_slices(other, 4, img.shape)] == 0).all()
        assert (255 - shade) % 25 == 0 and 0 <= (255 - shade) // 25 <= 9
        if it["split"] == "test":
            test_shades_off_label += shade != 255 - 25 * it["class_id"]
        else:
            assert shade == 255 - 25 * it["class_id"]
        assert it["ans"] == mn.DIGITS[it["class_id"]] and mn.DIGITS[it["class_id"]] in it["exp"][0]
    assert test_shades_off_label >= 5  # random class: 9 in 10 differ from the label


def test_train_and_val_are_disjoint_subsets_of_mnist_train_and_test_comes_from_mnist_test(tmp_path):
    parts = mn.decoy_splits(write_mnist(tmp_path / "m"), 20, 8, 10, seed=3)
    tr, va, te = (set(parts[s][0].tolist()) for s in ("train", "val", "test"))
    assert not tr & va and max(tr | va) < N_TRAIN and max(te) < N_TEST and len(te) == 10
    again = mn.decoy_splits(tmp_path / "m", 20, 8, 10, seed=3)  # a function of its arguments
    assert (again["test"][1].images == parts["test"][1].images).all()
    assert (parts["test"][1].clean[:, :4, :4] == 0).all()  # the swatch-free copy has no swatch


def test_held_out_digits_follow_train_and_val_and_change_no_other_split(tmp_path):
    """n_held_out adds training digits disjoint from train and val, built like val (the label's shade), and a copy
    with a random class's shade (same digits, noise and corner); train, val and test stay as they were."""
    root = write_mnist(tmp_path / "m")
    opts = mn.DecoyOptions(noise=0.1)
    plain = mn.decoy_splits(root, 20, 8, 10, seed=3, opts=opts)
    parts = mn.decoy_splits(root, 20, 8, 10, seed=3, opts=opts, n_held_out=12)
    for split in ("train", "val", "test"):
        assert (parts[split][0] == plain[split][0]).all() and (parts[split][1].images == plain[split][1].images).all()
    held, d = parts["held_out"]
    assert len(held) == 12 and not set(held) & (set(parts["train"][0]) | set(parts["val"][0])) and max(held) < N_TRAIN
    assert (d.shade == 255 - 25 * d.labels).all()
    shuffled = parts["held_out_shuffled"][1]
    assert (shuffled.clean == d.clean).all() and (shuffled.corner == d.corner).all()
    assert (shuffled.shade != d.shade).any()
    with pytest.raises(mn.MNISTError, match="13 held-out digits do not fit"):
        mn.decoy_splits(root, 20, 8, 10, seed=3, n_held_out=13)


def test_corner_masks_mark_everything_but_the_four_corners(tmp_path):
    out, ann = run(tmp_path, "--mask", "corners")
    m = np.load(out / next(iter(ann.values()))["visual_exp"])
    assert m.shape == (28, 28) and m.sum() == 28 * 28 - 4 * 16
    for k in range(4):
        assert (m[mn.corner_slices(k, 4, (28, 28))] == 0).all()
    ds = load_splits(out, image_size=28)
    assert len(ds["train"].expanded(False)) == 20 and len(ds["test"]) == 10
    item = ds["val"][0]
    assert item["has_mask"] and item["mask"][0, 0] == 0 and item["mask"][14, 14] == 1


def test_digit_masks_cover_the_dilated_strokes_and_fraction_thins_train_only(tmp_path):
    out, ann = run(tmp_path, "--mask", "digit", "--mask-fraction", "0.25")
    train = [it for it in ann.values() if it["split"] == "train"]
    assert sum(bool(it["visual_exp"]) for it in train) == 5
    assert all(it["visual_exp"] for it in ann.values() if it["split"] != "train")
    it = next(it for it in ann.values() if it["visual_exp"])
    img, m = read_png(out / it["image_path"]), np.load(out / it["visual_exp"])
    ink = img > 100
    ink[:4, :4] = ink[:4, -4:] = ink[-4:, :4] = ink[-4:, -4:] = False  # not the swatch
    assert m[ink].all() and m.sum() > ink.sum()  # dilated
    assert m[:4, :4].sum() == 0 and m[-4:, -4:].sum() == 0  # the swatch is not "the digit"


def test_harder_variant_lowers_contrast_and_adds_noise_but_keeps_the_swatch_exact():
    rng = np.random.default_rng(0)
    x, y = digits(10, rng)
    faint = mn.decoy(x, y, False, rng, mn.DecoyOptions(digit_contrast=0.3))
    assert faint.clean.max() == 60 and (faint.digit_mask == mn.decoy(x, y, False, rng).digit_mask).all()
    d = mn.decoy(x, y, False, rng, mn.DecoyOptions(digit_contrast=0.3, noise=0.2))
    # background noise clipped at 0: a rectified normal, std = σ·sqrt(1/2 - 1/(2π)) ≈ 0.58σ
    assert 0.5 * 0.2 * 255 < d.clean[:, 20:, 20:].std() < 0.66 * 0.2 * 255
    for i in range(10):
        assert (d.images[(i, *mn.corner_slices(int(d.corner[i]), 4, (28, 28)))] == 255 - 25 * y[i]).all()


def test_inverted_test_shade_is_cdeps_rule():
    rng = np.random.default_rng(0)
    x, y = digits(10, rng)
    opts = mn.DecoyOptions(swatch=5, test_shade="inverted")
    for test in (False, True):
        d = mn.decoy(x, y, test, rng, opts)
        for i in range(10):
            want = 25 * y[i] if test else 255 - 25 * y[i]  # CDEP's 00_make_data.py: 25·y in test
            assert (d.images[(i, *mn.corner_slices(int(d.corner[i]), 5, (28, 28)))] == want).all()
    with pytest.raises(ValueError, match="test_shade"):
        mn.decoy(x, y, True, rng, mn.DecoyOptions(test_shade="dark"))


def test_raw_files_and_torchvision_layout_are_accepted(tmp_path):
    _, ann = run(tmp_path, mnist=write_mnist(tmp_path / "tv", gz=False, layout="MNIST/raw"))
    assert len(ann) == 38


@pytest.mark.parametrize("damage", ["missing", "truncated", "bad-gzip", "wrong-magic"])
def test_a_missing_or_corrupt_file_is_named_in_one_line(tmp_path, damage):
    root = write_mnist(tmp_path / "m")
    victim = root / "t10k-labels-idx1-ubyte.gz"
    if damage == "missing":
        victim.unlink()
    elif damage == "truncated":
        data = gzip.decompress(victim.read_bytes())
        victim.write_bytes(gzip.compress(data[:-3]))
    elif damage == "bad-gzip":
        victim.write_bytes(b"\x1f\x8b" + b"garbage" * 5)
    else:
        data = gzip.decompress(victim.read_bytes())
        victim.write_bytes(gzip.compress((2051).to_bytes(4, "big") + data[4:]))
    with pytest.raises(SystemExit) as e:
        run(tmp_path, mnist=root)
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte" in msg and msg.startswith("megl.data.convert: error:") and "\n" not in msg
    assert not (tmp_path / "out" / "exp_annotation.json").exists()


def test_bad_sizes_and_an_existing_output_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--n-train"):
        run(tmp_path, "--n-train", "100")
    run(tmp_path)
    with pytest.raises(SystemExit, match="--overwrite"):
        run(tmp_path)
    with pytest.raises(SystemExit, match=r"--mask-fraction"):
        run(tmp_path, "--overwrite", "--mask-fraction", "1.5")


def tiny_experiment(out: Path, methods: str) -> list[str]:
    """decoy-mnist arguments for a run of a few steps on the tiny IDX files (cnn, one epoch of two steps)."""
    return ["decoy-mnist", "--backbone", "cnn", "--methods", methods, "--n-train", "20", "--n-val", "8", "--n-test",
            "10", "--epochs", "1", "--max-steps-per-epoch", "2", "--out", str(out), "--threads", "1", "--set",
            "tokenizer_vocab_size=300", "--set", "batch_size=8"]


def test_decoy_experiment_smoke_writes_its_table(tmp_path, monkeypatch):
    from megl import experiments

    monkeypatch.setenv(mn.ENV, str(write_mnist(tmp_path / "mnist")))
    out = tmp_path / "exp"
    argv = tiny_experiment(out, "baseline,rrr")
    assert experiments.main(argv) == 0
    md = (out / "table-cnn-hard-f1.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["plain (CE)", "RRR"]
    res = json.loads((out / "table-cnn-hard-f1.json").read_text())["results"]
    for method in ("baseline", "rrr"):
        r = res[method][0]
        assert 0 <= r["test"] <= 1 and 0 <= r["test_clean"] <= 1 and 0 <= r["miou"] <= 1 and r["epoch_seconds"] > 0
        # the conv nets are scored on every test digit and on the training digits left after train and val
        assert r["scored"] == {"train": 20, "val": 8, "test": N_TEST, "held_out": N_TRAIN - 28,
                               "held_out_shuffled": N_TRAIN - 28} and 0 <= r["held_out_clean"] <= 1
    # RRR reads the corners annotation, the others the digit annotation (same images)
    cfg = {m: json.loads((Path(res[m][0]["run_dir"]) / "config.json").read_text()) for m in ("baseline", "rrr")}
    assert "corners-" in cfg["rrr"]["data_root"] and "digit-" in cfg["baseline"]["data_root"]
    # --no-train tabulates the finished seed and says which are missing, training nothing
    assert experiments.main(argv[:argv.index("--epochs")] + ["--seeds", "0,1", "--no-train"]
                            + argv[argv.index("--epochs"):]) == 0
    md = (out / "table-cnn-hard-f1.md").read_text()
    assert "baseline: 1 of 2 seeds finished" in md and not list((out / "runs").glob("*seed1*"))
    # the mlp skips Grad-CAM methods with a note
    assert experiments.main(argv[:2] + ["mlp", "--methods", "baseline,megl"] + argv[5:]) == 0
    assert "megl on the mlp: n/a" in (out / "table-mlp-paper-f1.md").read_text()


def test_a_decoy_sweep_prints_no_test_accuracy(tmp_path, monkeypatch, capfd):
    """Sweeps choose on val: what they print while training must not show the test split (the table does)."""
    from megl import experiments

    monkeypatch.setenv(mn.ENV, str(write_mnist(tmp_path / "mnist")))
    argv = tiny_experiment(tmp_path / "exp", "baseline")
    assert experiments.main(argv + ["--sweep", "lr=0.001"]) == 0
    err = capfd.readouterr().err
    assert "val acc" in err and "test acc" not in err
    assert experiments.main(argv + ["--seeds", "1"]) == 0
    assert "test acc" in capfd.readouterr().err


def test_the_annotation_can_be_swept_and_is_named_in_the_table(tmp_path, monkeypatch):
    """--sweep annotation=digit,corners trains one method on either mask copy (same images); a bad value is refused."""
    from megl import experiments

    monkeypatch.setenv(mn.ENV, str(write_mnist(tmp_path / "mnist")))
    out = tmp_path / "exp"
    argv = tiny_experiment(out, "baseline")
    assert experiments.main(argv + ["--sweep", "annotation=digit,corners"]) == 0
    res = json.loads((out / "sweep-cnn-hard-f1.json").read_text())["results"]
    roots = {k: json.loads((Path(v[0]["run_dir"]) / "config.json").read_text())["data_root"] for k, v in res.items()}
    assert "digit-" in roots["baseline annotation=digit"] and "corners-" in roots["baseline annotation=corners"]
    assert experiments.main(argv + ["--annotation", "corners"]) == 0
    note = "Annotation `corners` (1 everywhere but the four corners): plain (CE)."
    assert note in (out / "table-cnn-hard-f1.md").read_text()
    with pytest.raises(SystemExit, match="--sweep annotation takes corners and digit"):
        experiments.main(argv + ["--sweep", "annotation=strokes"])


def test_megl_with_the_pretrained_standins_is_scored_from_its_run(tmp_path, monkeypatch):
    """The table rebuilds MEGL from its run directory, stand-in weights included (it used to ask for them and fail)."""
    from megl import experiments

    monkeypatch.setenv(mn.ENV, str(write_mnist(tmp_path / "mnist")))
    monkeypatch.setenv("MEGL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "exp"
    assert experiments.main(tiny_experiment(out, "megl") + ["--set", "clip_model=tiny", "--set", "llm=tiny"]) == 0
    run_dir = Path(json.loads((out / "table-cnn-hard-f1.json").read_text())["results"]["megl"][0]["run_dir"])
    assert sorted(p.name for p in (run_dir / "standins").iterdir()) == ["clip.safetensors", "llm.safetensors"]


def test_decoy_experiment_without_mnist_says_how_to_point_at_it(tmp_path, monkeypatch):
    from megl import experiments

    monkeypatch.delenv(mn.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="--mnist DIR"):
        experiments.main(["decoy-mnist", "--out", str(tmp_path / "x")])

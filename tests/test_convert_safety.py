"""megl.data.convert never destroys its inputs: it builds beside --out and swaps the result in."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from megl.data import load_splits
from megl.data.convert import main

sys.path.insert(0, str(Path(__file__).parent))
from test_data_convert import H, W, _dump, _img, actx_raw  # noqa: E402,F401  (actx_raw: fixture)


def _actx(raw, out, *extra, images=None):
    return ["actx", "--exp", f"train={raw['exp']}", "--images", str(images or raw["images"]), "--visual",
            raw["visual"], "--out", str(out), *extra]


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("link", [False, True])
def test_images_already_in_the_output_folder_survive(actx_raw, link):
    out = actx_raw["tmp"] / "ds"
    for k in (1, 2, 3, 5):  # the user put the images where the dataset will live
        _img(out / "images" / f"{k:09d}.jpg", k)
    before = _files(out / "images")
    extra = ("--link",) if link else ()
    assert main(_actx(actx_raw, out, *extra, images=out / "images")) == 0
    after = {p.name: p for p in (out / "images").iterdir()}
    assert {n: p.read_bytes() for n, p in after.items()} == {Path(k).name: v for k, v in before.items()}
    assert not any(p.is_symlink() for p in after.values())  # never a link to itself
    # and a second conversion over the dataset's own images, with --overwrite
    assert main(_actx(actx_raw, out, "--overwrite", *extra, images=out / "images")) == 0
    assert {p.name: p.read_bytes() for p in (out / "images").iterdir()} == {Path(k).name: v for k, v in before.items()}
    assert load_splits(out, image_size=16, val_fraction=0.0, test_fraction=0.0)["train"].num_images == 4


def test_reconverting_keeps_the_inputs_it_drops(actx_raw, capsys):
    out = actx_raw["tmp"] / "ds"
    assert main(_actx(actx_raw, out)) == 0
    before = _files(out / "images")
    capsys.readouterr()
    # a stricter class filter over the dataset's own images: the dropped classes' images were inputs
    assert main(_actx(actx_raw, out, "--overwrite", "--classes", "skiing", images=out / "images")) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000001.jpg", "000000002.jpg"]
    kept = [p for p in out.parent.iterdir() if p.name.startswith(".ds.previous")]
    assert len(kept) == 1 and _files(kept[0] / "images") == before
    assert str(kept[0]) in capsys.readouterr().out


def test_a_failure_halfway_leaves_the_old_dataset_whole(actx_raw, monkeypatch):
    out = actx_raw["tmp"] / "ds"
    assert main(_actx(actx_raw, out)) == 0
    before = _files(out)
    calls = []

    def failing_save(*a, **k):  # the disk fills up at the second mask
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return np.lib.format.write_array(open(a[0], "wb"), a[1])

    monkeypatch.setattr("megl.data.convert.np.save", failing_save)
    with pytest.raises(SystemExit, match="error: no space left on the device"):  # one line, no traceback
        main(_actx(actx_raw, out, "--overwrite"))
    assert _files(out) == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_a_corrupt_image_with_a_mask_is_counted_not_fatal(actx_raw, capsys):
    Path(actx_raw["images"], "000000001.jpg").write_bytes(b"not a jpeg")  # k1 has a mask
    out = actx_raw["tmp"] / "ds"
    assert main(_actx(actx_raw, out)) == 0
    ann = json.loads((out / "exp_annotation.json").read_text())
    assert ann["k1"]["visual_exp"] == "" and "mask ignored   1  image unreadable" in capsys.readouterr().out


def test_mask_file_names_are_unique(tmp_path):
    for k in (1, 2):
        _img(tmp_path / "img" / f"{k}.jpg", k)
    exp = _dump(tmp_path / "x.json", {"a b": {"img_id": "1", "ans": "run", "exp": ["x"]},
                                      "a_b": {"img_id": "2", "ans": "run", "exp": ["y"]}})
    (tmp_path / "vis").mkdir()
    first, second = np.zeros((H, W), np.float32), np.zeros((H, W), np.float32)
    first[:5], second[-5:] = 1.0, 1.0
    np.save(tmp_path / "vis" / "a b.npy", first)
    np.save(tmp_path / "vis" / "a_b.npy", second)
    out = tmp_path / "ds"
    assert main(["actx", "--exp", exp, "--images", str(tmp_path / "img"), "--visual", str(tmp_path / "vis"),
                 "--out", str(out)]) == 0
    ann = json.loads((out / "exp_annotation.json").read_text())
    assert ann["a b"]["visual_exp"] != ann["a_b"]["visual_exp"]
    np.testing.assert_array_equal(np.load(out / ann["a b"]["visual_exp"]), first)
    np.testing.assert_array_equal(np.load(out / ann["a_b"]["visual_exp"]), second)


def test_out_that_is_a_file_is_refused_and_kept(actx_raw):
    out = actx_raw["tmp"] / "notes.txt"
    out.write_text("mine")
    with pytest.raises(SystemExit, match=r"^megl.data.convert: error: --out .*notes.txt is a file"):
        main(_actx(actx_raw, out))
    assert out.read_text() == "mine" and not [p for p in out.parent.iterdir() if p.name.startswith(".")]

"""MNIST's raw IDX files and DecoyMNIST (Ross, Hughes & Doshi-Velez 2017, "Right for the Right Reasons", §4).

DecoyMNIST adds a swatch to every digit: a square (4×4 px in the paper) in a random corner whose grey shade is
255 − 25·y in training and validation, so the shade alone predicts the label, and the shade of a random digit in
test, so a model that read the shade is fooled. RRR's reference code (github.com/dtak/rrr, decoy_mnist.py) draws
the corner and, in test, a random class per image, as here.

`DecoyOptions` also makes the digit the *harder* cue for models that learn shapes faster than grey levels (a
small CNN reads digits before the shade): lower digit contrast, additive noise, a larger swatch (see
docs/decoy_mnist.md for the measurements behind the documented variant).
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

# torchvision's names (MNIST/raw/), gzip-compressed or not
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_MAGIC = {3: 2051, 1: 2049}  # images (N, H, W) uint8, labels (N,) uint8
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
ENV = "MEGL_MNIST"  # where the experiment looks for MNIST when --mnist is not given


class MNISTError(ValueError):
    """A missing or malformed MNIST file; the message names it."""


# ----------------------------------------------------------------------------- IDX
def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file (gzip or raw) of unsigned bytes with `ndim` dimensions."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise MNISTError(f"{path}: cannot read it ({type(e).__name__}: {e}); re-download the file")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MNISTError(f"{path}: {len(data)} bytes, shorter than an IDX header; the file is truncated")
    magic = int.from_bytes(data[:4], "big")
    if magic != IDX_MAGIC[ndim]:
        raise MNISTError(f"{path}: IDX magic number {magic}, expected {IDX_MAGIC[ndim]} "
                         f"({'images' if ndim == 3 else 'labels'}); is it the right file?")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    want = int(np.prod(shape))
    if len(data) - header != want:
        raise MNISTError(f"{path}: header says {shape} ({want} bytes of data) but the file holds "
                         f"{len(data) - header}; the file is truncated or corrupt")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def find_idx(root: Path, stem: str) -> Path:
    """`stem`[.gz] in root, root/raw or root/MNIST/raw (torchvision's layout)."""
    for d in (root, root / "raw", root / "MNIST" / "raw"):
        for name in (stem + ".gz", stem):
            if (d / name).is_file():
                return d / name
    raise MNISTError(f"{root / stem}[.gz] not found (also looked in raw/ and MNIST/raw/): point --mnist at a "
                     "folder with MNIST's four IDX files")


def load_mnist(root: str | Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64) of MNIST's 'train' or 'test' part."""
    root = Path(root)
    if not root.is_dir():
        raise MNISTError(f"MNIST folder {root} does not exist: pass --mnist DIR (or set {ENV}) to a folder holding "
                         "train-images-idx3-ubyte.gz and the other three IDX files")
    img_path, lab_path = (find_idx(root, s) for s in FILES[part])
    images, labels = read_idx(img_path, 3), read_idx(lab_path, 1)
    if len(images) != len(labels):
        raise MNISTError(f"{img_path} holds {len(images)} images but {lab_path} {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise MNISTError(f"{lab_path}: label {int(labels.max())} is not a digit 0-9")
    return images, labels.astype(np.int64)


# ----------------------------------------------------------------------------- the decoy
TEST_SHADES = ("random", "inverted")


@dataclass(frozen=True)
class DecoyOptions:
    swatch: int = 4  # side of the square, px (paper: 4)
    shade_step: int = 25  # shade = 255 - shade_step * class (paper: 25)
    digit_contrast: float = 1.0  # strokes scaled to this fraction of their ink (harder variant: < 1)
    noise: float = 0.0  # std of additive Gaussian pixel noise, in [0, 1] units, over the whole image
    dilate: int = 1  # the `digit` mask: ink dilated by this many px
    test_shade: str = "random"  # test swatch: a random class's shade (RRR), or "inverted": 255 − the label's (CDEP)


class Decoyed(NamedTuple):
    images: np.ndarray  # (N, H, W) uint8, with swatch (and the variant's contrast / noise)
    clean: np.ndarray  # (N, H, W) uint8, the same digit, contrast and noise, without a swatch
    labels: np.ndarray  # (N,)
    corner: np.ndarray  # (N,) index into CORNERS
    shade: np.ndarray  # (N,) grey level of the swatch
    digit_mask: np.ndarray  # (N, H, W) float32 {0, 1}: dilated strokes


def corner_slices(k: int, size: int, hw: tuple[int, int]) -> tuple[slice, slice]:
    h, w = hw
    rows = slice(0, size) if k in (0, 1) else slice(h - size, h)
    cols = slice(0, size) if k in (0, 2) else slice(w - size, w)
    return rows, cols


def corners_mask(size: int, hw: tuple[int, int] = (28, 28)) -> np.ndarray:
    """RRR / CDEP's annotation: 1 everywhere except the four corner squares where a swatch may sit."""
    m = np.ones(hw, dtype=np.float32)
    for k in range(4):
        m[corner_slices(k, size, hw)] = 0.0
    return m


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation of (..., H, W) by a (2r+1)² square (max over shifts; no scipy needed)."""
    out = mask.copy()
    h, w = mask.shape[-2:]
    padded = np.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(r, r), (r, r)])
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            np.maximum(out, padded[..., dy:dy + h, dx:dx + w], out=out)
    return out


def decoy(images: np.ndarray, labels: np.ndarray, test: bool, rng: np.random.Generator,
          opts: DecoyOptions = DecoyOptions()) -> Decoyed:
    """Add the swatch to each digit: shade from its label, or in the test split by `opts.test_shade`."""
    n, h, w = images.shape
    if opts.test_shade not in TEST_SHADES:
        raise ValueError(f"decoy: test_shade must be one of {', '.join(TEST_SHADES)}, got {opts.test_shade!r}")
    if 255 - opts.shade_step * 9 < 0 or opts.swatch < 1 or 2 * opts.swatch > min(h, w):
        raise ValueError(f"decoy: swatch {opts.swatch} px / shade step {opts.shade_step} do not fit a {h}x{w} "
                         "image with 10 shades in 0..255")
    ink = images.astype(np.float32) / 255.0
    digit_mask = dilate((ink > 0.25).astype(np.float32), opts.dilate)
    x = ink * opts.digit_contrast
    if opts.noise > 0:
        x = x + rng.normal(0.0, opts.noise, size=x.shape).astype(np.float32)
    corner = rng.integers(0, 4, size=n)
    shade = 255 - opts.shade_step * labels
    if test and opts.test_shade == "random":  # RRR's: a random class's shade
        shade = 255 - opts.shade_step * rng.integers(0, 10, size=n)
    elif test:  # "inverted", CDEP's 00_make_data.py: shade_step·y
        shade = 255 - shade
    shade = shade.astype(np.uint8)
    clean = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    out = clean.copy()
    for i in range(n):
        out[(i, *corner_slices(int(corner[i]), opts.swatch, (h, w)))] = shade[i]
    return Decoyed(out, clean, labels, corner, shade, digit_mask)


def where_digit(mask: np.ndarray) -> str:
    """Where the strokes sit, in words: 'in the centre', 'in the upper left', ..."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return "in the centre"
    h, w = mask.shape
    v = "upper " if ys.mean() < h / 3 else "lower " if ys.mean() > 2 * h / 3 else ""
    u = "left" if xs.mean() < w / 3 else "right" if xs.mean() > 2 * w / 3 else ""
    return f"in the {v}{u}".strip() if (v or u) else "in the centre"


def rationale(label: int, mask: np.ndarray) -> str:
    """A templated rationale that names the digit and where it sits (not the swatch: that is the decoy)."""
    ys = np.nonzero(mask)[0]
    size = "large" if len(ys) and np.ptp(ys) > 0.6 * mask.shape[0] else "small"
    return (f"the handwritten strokes {where_digit(mask)} of the image form the digit {DIGITS[label]}, "
            f"a {size} {DIGITS[label]}")


def decoy_splits(mnist_dir: str | Path, n_train: int, n_val: int, n_test: int, seed: int = 0,
                 opts: DecoyOptions = DecoyOptions(), n_held_out: int = 0) -> dict[str, tuple[np.ndarray, Decoyed]]:
    """{split: (MNIST indices, Decoyed)}: train and val are disjoint random subsets of MNIST's training part, test
    of its test part; a function of the arguments alone (the experiment rebuilds the swatch-free test digits).
    n_held_out > 0 adds "held_out": that many further training digits after train and val in the same draw, built
    like val, and "held_out_shuffled": the same digits with a random class's shade, as test has it. Train, val and
    test do not depend on it."""
    X, Y = load_mnist(mnist_dir, "train")
    Xt, Yt = load_mnist(mnist_dir, "test")
    if n_train < 1 or n_val < 0 or n_test < 1 or n_train + n_val > len(X) or n_test > len(Xt):
        raise MNISTError(f"--n-train {n_train} + --n-val {n_val} must be at most {len(X)} (MNIST's training part) "
                         f"and --n-test {n_test} at most {len(Xt)}, all positive")
    perm = np.random.default_rng([seed, 0]).permutation(len(X))
    idx = {"train": np.sort(perm[:n_train]), "val": np.sort(perm[n_train:n_train + n_val]),
           "test": np.sort(np.random.default_rng([seed, 1]).permutation(len(Xt))[:n_test])}
    out = {}
    for k, (split, (images, labels)) in enumerate(zip(idx, ((X, Y), (X, Y), (Xt, Yt)))):
        i = idx[split]
        out[split] = (i, decoy(images[i], labels[i], split == "test", np.random.default_rng([seed, 2 + k]), opts))
    if n_held_out > 0:
        if n_train + n_val + n_held_out > len(X):
            raise MNISTError(f"{n_held_out} held-out digits do not fit: MNIST's training part has "
                             f"{len(X) - n_train - n_val} left after train and val")
        i = np.sort(perm[n_train + n_val:n_train + n_val + n_held_out])
        for name, shuffled in (("held_out", False), ("held_out_shuffled", True)):  # one draw of noise and corner
            out[name] = (i, decoy(X[i], Y[i], shuffled, np.random.default_rng([seed, 5]), opts))
    return out

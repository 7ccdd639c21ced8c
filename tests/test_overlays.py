"""megl.overlays: the one overlay drawer that training, megl.predict and the evaluation report use."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from megl import overlays


def test_jet_runs_blue_to_red():
    c = overlays.jet(np.array([[0.0, 0.5, 1.0]]))[0]
    np.testing.assert_allclose(c, [[0, 0, 0.5], [0.5, 1, 0.5], [0.5, 0, 0]])


def test_panel_layout_and_pixels(tmp_path):
    image = torch.zeros(3, 4, 4)
    image[0] = 1.0  # red
    saliency = torch.zeros(4, 4)
    mask = torch.zeros(4, 4)
    mask[:2] = 1.0
    overlays.save_panel(tmp_path / "p.png", image, saliency, mask, scale=2)
    with Image.open(tmp_path / "p.png") as im:
        assert im.size == (3 * 4 * 2, 4 * 2)  # image | overlay | mask, 2x
        px = np.asarray(im.convert("RGB"))
    assert tuple(px[0, 0]) == (255, 0, 0)
    assert tuple(px[0, 8]) == (128, 0, 64)  # half red image, half jet(0) = dark blue
    assert tuple(px[0, 16]) == (255, 255, 255) and tuple(px[7, 16]) == (0, 0, 0)  # mask top half
    overlays.save_panel(tmp_path / "q.png", image, saliency)
    with Image.open(tmp_path / "q.png") as im:
        assert im.size == (2 * 4 * 4, 4 * 4)


def test_a_wrong_image_shape_is_named():
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        overlays.saliency_overlay(torch.zeros(4, 4), torch.zeros(4, 4))

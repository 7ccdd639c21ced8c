"""megl.data.transforms: ImageNet / CLIP normalisation, differentiable CLIP preprocessing, mask resizing."""
import numpy as np
import pytest
import torch

from megl.data import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, clip_preprocess, normalize_imagenet, resize,
                       resize_mask, to_classifier_input)
from megl.data.transforms import normalize_mask_array


def test_normalize_imagenet_values_and_shapes():
    x = torch.rand(2, 3, 5, 7)
    y = normalize_imagenet(x)
    for c in range(3):
        assert torch.allclose(y[:, c], (x[:, c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c])
    assert torch.allclose(normalize_imagenet(x[0]), y[0])
    assert normalize_imagenet(x.double()).dtype == torch.float64
    with pytest.raises(ValueError, match="RGB"):
        normalize_imagenet(torch.rand(2, 1, 5, 5))
    with pytest.raises(TypeError, match="divide uint8 images by 255"):
        normalize_imagenet(torch.zeros(3, 4, 4, dtype=torch.uint8))
    z = to_classifier_input(x, size=11)
    assert z.shape == (2, 3, 11, 11) and torch.allclose(z, normalize_imagenet(resize(x, 11)))


def test_clip_preprocess_matches_resize_and_normalise():
    x = torch.rand(2, 3, 64, 64)
    y = clip_preprocess(x, size=224)
    assert y.shape == (2, 3, 224, 224)
    ref = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    for c in range(3):
        assert torch.allclose(y[:, c], (ref[:, c] - CLIP_MEAN[c]) / CLIP_STD[c], atol=1e-6)
    const = torch.full((1, 3, 40, 60), 0.25)  # non-square: short side to size, centre crop
    out = clip_preprocess(const, size=32)
    assert out.shape == (1, 3, 32, 32)
    assert torch.allclose(out[0, 1], torch.full((32, 32), (0.25 - CLIP_MEAN[1]) / CLIP_STD[1]), atol=1e-6)


def test_clip_preprocess_is_differentiable():
    x = torch.rand(1, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: clip_preprocess(t, size=9), (x,))
    big = torch.rand(1, 3, 20, 20, dtype=torch.float64, requires_grad=True)  # shrinking path (antialiased)
    assert torch.autograd.gradcheck(lambda t: clip_preprocess(t, size=7), (big,))
    # gradients reach a saliency map through I ⊙ Â
    img = torch.rand(1, 3, 16, 16)
    sal = torch.rand(1, 16, 16, requires_grad=True)
    clip_preprocess(img * sal[:, None], size=24).square().sum().backward()
    assert sal.grad is not None and sal.grad.abs().sum() > 0


def test_masks_resize_exactly_like_their_image():
    img = torch.rand(3, 30, 45)
    mask = img[1].clone()
    for size in (12, 60, (20, 30)):
        assert torch.allclose(resize_mask(mask, size), resize(img, size)[1].clamp(0, 1), atol=1e-6)
    m = resize_mask(torch.ones(8, 8), 32)
    assert m.min() >= 0 and m.max() <= 1 and m.shape == (32, 32)


def test_normalize_mask_array():
    k = np.stack([np.eye(4), np.zeros((4, 4))]).astype(np.uint8) * 200
    m = normalize_mask_array(k)
    np.testing.assert_allclose(m, np.eye(4))  # mean over k, then (m - min) / (max - min)
    assert normalize_mask_array(np.full((3, 3), 0.4)) is None
    np.testing.assert_allclose(normalize_mask_array(np.array([[True, False]])), [[1.0, 0.0]])

"""MEGL's counterfactual background term: the classifier on the image with its object removed knows no class."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megl.losses.megl import background_loss, remove_object, swap_composite


class Linear(torch.nn.Module):
    """A classifier on the flattened image, returning `.logits` as megl's classifiers do."""

    def __init__(self, pixels: int, classes: int):
        super().__init__()
        self.fc = torch.nn.Linear(pixels, classes)

    def forward(self, x):
        return SimpleNamespace(logits=self.fc(x.flatten(1)))


def test_remove_object_paints_the_mask_with_the_batch_mean_colour():
    image = torch.rand(2, 3, 4, 4)
    mask = torch.zeros(2, 4, 4)
    mask[0, 1:3, 1:3] = 1  # sample 1 has an empty mask: unchanged
    out = remove_object(image, mask)
    keep = mask[0] == 0
    assert torch.equal(out[0][:, keep], image[0][:, keep])
    fill = image.mean((0, 2, 3))  # one colour for the batch, so no image's own decoy leaks into its fill
    assert torch.allclose(out[0][:, ~keep], fill[:, None].expand(3, 4))
    assert torch.equal(out[1], image[1])


def test_background_loss_is_kl_from_uniform_on_annotated_samples():
    torch.manual_seed(0)
    clf = Linear(16, 5)
    image, mask = torch.rand(4, 1, 4, 4), (torch.rand(4, 4, 4) > 0.5).float()
    has_mask = torch.tensor([True, False, True, False])
    loss = background_loss(clf, image, mask, has_mask)
    logp = F.log_softmax(clf(remove_object(image, mask)).logits, 1)[has_mask]
    expected = (-logp.mean(1) - math.log(5)).mean()  # KL(u ‖ p) = −log C − mean_c log p_c
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6) and loss.item() > 0
    loss.backward()
    assert clf.fc.weight.grad.abs().sum() > 0
    assert background_loss(clf, image, mask, torch.zeros(4, dtype=torch.bool)).item() == 0.0
    # the public name takes a plain model returning logits too, and checks the mask's shape
    import megl.losses

    plain = lambda x: clf(x).logits  # noqa: E731
    assert megl.losses.background(plain, image, mask, has_mask).item() == pytest.approx(loss.item())
    with pytest.raises(ValueError, match="mask must be"):
        megl.losses.background(plain, image, mask[:, :2])


@pytest.mark.parametrize("mode", ["uniform", "swap", "transplant"])
def test_background_term_takes_the_weight_off_a_decoy_pixel(mode):
    # pixel 0 is the object (in the mask, a noisy cue), pixel 1 a decoy outside it that names the class exactly
    torch.manual_seed(0)
    n = 256
    y = torch.randint(0, 2, (n,))
    sign = y.float() * 2 - 1
    x = torch.stack([sign + 0.8 * torch.randn(n), sign], 1).view(n, 1, 1, 2)
    mask = torch.zeros(n, 1, 2)
    mask[..., 0] = 1
    weights = {}
    for lam in (0.0, 1.0):
        torch.manual_seed(1)
        clf = Linear(2, 2)
        opt = torch.optim.Adam(clf.parameters(), lr=0.05)
        for _ in range(200):
            loss = F.cross_entropy(clf(x).logits, y)
            if lam:
                loss = loss + lam * background_loss(clf, x, mask, torch.ones(n, dtype=torch.bool), y, mode)
            opt.zero_grad()
            loss.backward()
            opt.step()
        w = clf.fc.weight.detach()
        weights[lam] = (w[1] - w[0]).abs()  # the evidence each pixel gives for one class over the other
    assert weights[0.0][1] > weights[0.0][0]  # CE alone leans on the decoy
    assert weights[1.0][1] < 0.25 * weights[0.0][1]  # the term takes most of that weight off
    assert weights[1.0][0] > weights[0.0][0]  # and the object carries the decision instead


def test_swap_pastes_the_next_annotated_object_onto_a_cleared_background():
    image = torch.arange(3 * 1 * 1 * 2, dtype=torch.float).view(3, 1, 1, 2)  # pixel 0: object, pixel 1: background
    mask = torch.tensor([[[1.0, 0.0]]]).expand(3, 1, 2).clone()
    label = torch.tensor([0, 1, 2])
    seen = {}

    def clf(x):
        seen["x"] = x.clone()
        return torch.zeros(x.shape[0], 3)

    has = torch.tensor([True, False, True])
    loss = background_loss(clf, image, mask, has, label, "swap")
    # annotated 0 and 2: 0's background with 2's object, and 2's background with 0's object; labels 2 and 0
    assert seen["x"].view(2, 2).tolist() == [[4.0, 1.0], [0.0, 5.0]]
    assert loss.item() == pytest.approx(math.log(3))
    assert background_loss(clf, image, mask, torch.tensor([True, False, False]), label, "swap").item() == 0.0
    with pytest.raises(ValueError, match="needs the labels"):
        background_loss(clf, image, mask, has, None, "swap")
    with pytest.raises(ValueError, match="mode must be"):
        background_loss(clf, image, mask, has, label, "blur")


def test_transplant_fills_the_union_of_both_masks_from_the_donor_and_paints_nothing():
    # 1 x 3 images: image 0's object is pixel 0, image 1's is pixel 1; pixel 2 is background (a decoy's place)
    image = torch.tensor([[10.0, 11.0, 12.0], [20.0, 21.0, 22.0]]).view(2, 1, 1, 3)
    mask = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]])
    idx = torch.tensor([0, 1])
    composite, donor = swap_composite(image, mask, idx, "transplant")
    assert donor.tolist() == [1, 0]
    # host 0 keeps only pixel 2 (outside both masks); every other pixel is the donor's own
    assert composite.view(2, 3).tolist() == [[20.0, 21.0, 12.0], [10.0, 11.0, 22.0]]
    swapped, _ = swap_composite(image, mask, idx, "swap")  # the host's object is painted with the batch mean
    assert swapped.view(2, 3)[0, 0].item() == pytest.approx(image.mean().item())


def test_megl_loss_logs_the_background_part(tmp_path):
    from megl.train import Dist, train

    from test_train import tiny_config

    config = tiny_config(lambda_background=1.0, grad_share_batches=1, train_eval_size=0)
    (entry,) = train(config, tmp_path, Dist("cpu"), progress=False)
    assert "background" in entry["grad_share"] and entry["grad_norm"]["background"] > 0
    with pytest.raises(ValueError, match="lambda_background"):
        tiny_config(lambda_background=-1.0)
    with pytest.raises(ValueError, match="background_mode"):
        tiny_config(background_mode="blur")

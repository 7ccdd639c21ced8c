"""The comparison methods' losses (GRADIA, HAICS, RES-G/L, RRR, CDEP): hand-computed values on tiny cases,
equivalence with the reference algorithms, and that each loss decreases when a tiny model trains on it."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from megl.losses.cdep import (
    CDUnsupported, cd_maxpool, cd_module, cd_relu, cdep_loss, cdep_penalty, contextual_decomposition,
)
from megl.losses.common import hparam
from megl.losses.gradia import DEFAULTS as GRADIA_DEFAULTS
from megl.losses.gradia import gradia_loss
from megl.losses.haics import DEFAULTS as HAICS_DEFAULTS
from megl.losses.haics import haics_loss, haics_visual_loss
from megl.losses.res import (
    ResImputation, bf_threshold, gaussian_imputation, res_g_loss, res_l_loss, res_visual_loss, setup_res_l,
)
from megl.losses.rrr import input_gradients, rrr_loss, rrr_penalty, rrr_terms
from megl.methods import get_method
from megl.ops import gap_linear_gradcam_gradients

DT = torch.float64


class Out(NamedTuple):
    logits: torch.Tensor
    activations: torch.Tensor
    features: Optional[torch.Tensor] = None


class FixedCAM(nn.Module):
    """Activations = a fixed tensor A (one per sample), head = GAP + linear: Grad-CAM is computable by hand."""

    def __init__(self, acts: torch.Tensor, weight: torch.Tensor):
        super().__init__()
        self.acts = nn.Parameter(acts.clone())
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False).to(acts.dtype)
        with torch.no_grad():
            self.fc.weight.copy_(weight)

    def forward(self, image):
        return Out(self.fc(self.acts.mean(dim=(2, 3))), self.acts)

    def gradcam_gradients(self, out, target):
        return gap_linear_gradcam_gradients(self.fc.weight, target, tuple(out.activations.shape[-2:]))


def fixed_case():
    """Sample 0: z = [[0,1],[2,3]] -> saliency [[0,1/3],[2/3,1]], mask [[0,0],[1,1]], label 0 (annotated);
    sample 1: unannotated, label 1."""
    acts = torch.tensor([[[[0.0, 4.0], [8.0, 12.0]]], [[[4.0, 0.0], [0.0, 0.0]]]], dtype=DT)
    weight = torch.tensor([[1.0], [-1.0]], dtype=DT)
    batch = {
        "image": torch.ones(2, 3, 2, 2, dtype=DT),
        "label": torch.tensor([0, 1]),
        "mask": torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]], dtype=DT),
        "has_mask": torch.tensor([True, False]),
    }
    # logits: sample 0 GAP = 6 -> [6, -6]; sample 1 GAP = 1 -> [1, -1]
    ce = (math.log1p(math.exp(-12.0)) + math.log1p(math.exp(2.0))) / 2
    return FixedCAM(acts, weight), batch, ce


# ----------------------------------------------------------------------------- registry / config
def test_registry_resolves_every_comparison_method():
    for name, fn in [("gradia", gradia_loss), ("haics", haics_loss), ("res-g", res_g_loss), ("res-l", res_l_loss),
                     ("rrr", rrr_loss), ("cdep", cdep_loss)]:
        assert get_method(name).resolve("loss") is fn
    assert get_method("res-l").resolve("setup") is setup_res_l


def test_hparam_lookup_order():
    class C:
        method_args = {"res_eta": 0.5}
        gradia_lambda = 2.0
        rrr_lambda = None

    assert hparam(C(), "res_eta", 0.1) == 0.5
    assert hparam(C(), "gradia_lambda", 1.0) == 2.0
    assert hparam(C(), "rrr_lambda", 1000.0) == 1000.0
    assert hparam({"cdep_lambda": 3}, "cdep_lambda", 10) == 3
    assert hparam(None, "x", 7) == 7


def test_bad_batch_is_a_clear_error():
    model, batch, _ = fixed_case()
    with pytest.raises(KeyError, match="has_mask"):
        gradia_loss(model, {k: v for k, v in batch.items() if k != "has_mask"})


# ----------------------------------------------------------------------------- GRADIA
def test_gradia_hand_value():
    model, batch, ce = fixed_case()
    out = gradia_loss(model, batch, None, {"backend": "reference"})
    # |s - A| = [0, 1/3, 1/3, 0] -> 1/6 on the one annotated sample; the unannotated one adds CE only
    assert out["visual"].item() == pytest.approx(1 / 6, abs=1e-7)
    assert out["ce"].item() == pytest.approx(ce, abs=1e-9)
    assert out["total"].item() == pytest.approx(ce + GRADIA_DEFAULTS["gradia_lambda"] / 6, abs=1e-6)
    out = gradia_loss(model, batch, None, {"saliency_backend": "reference", "method_args": {"gradia_lambda": 3.0}})
    assert out["total"].item() == pytest.approx(ce + 3 / 6, abs=1e-7)


def test_unannotated_batch_gets_ce_only():
    model, batch, ce = fixed_case()
    batch["has_mask"] = torch.tensor([False, False])
    for fn in (gradia_loss, haics_loss, res_g_loss):
        out = fn(model, batch, None, {"backend": "reference"})
        assert out["visual"].item() == 0.0
        assert out["total"].item() == pytest.approx(ce, abs=1e-9)


# ----------------------------------------------------------------------------- HAICS
def test_haics_hand_value():
    model, batch, ce = fixed_case()
    out = haics_loss(model, batch, None, {"backend": "reference"})
    eps = 1e-4
    # pixels (s, A): (0->eps, 0), (1/3, 0), (2/3, 1), (1->1-eps, 1)
    expected = (-math.log(1 - eps) - math.log(2 / 3) - math.log(2 / 3) - math.log(1 - eps)) / 4
    assert out["visual"].item() == pytest.approx(expected, rel=1e-5)
    assert out["total"].item() == pytest.approx(ce + HAICS_DEFAULTS["haics_lambda"] * expected, rel=1e-5)


def test_haics_annotated_pixels_restrict_the_loss():
    s = torch.tensor([[[0.5, 0.25]]], dtype=DT)
    a = torch.tensor([[[1.0, 0.0]]], dtype=DT)
    only_first = torch.tensor([[[1.0, 0.0]]], dtype=DT)
    v = haics_visual_loss(s, a, torch.tensor([True]), annotated_pixels=only_first)
    assert v.item() == pytest.approx(-math.log(0.5))
    v_all = haics_visual_loss(s, a, torch.tensor([True]))
    assert v_all.item() == pytest.approx((-math.log(0.5) - math.log(0.75)) / 2)


# ----------------------------------------------------------------------------- RES
def bf_reference(x, y, eps=1e-4):
    """Literal port of RES.py's BF_solver loops (without .cuda())."""
    x, y = x.flatten(), y.flatten()
    g_idx = (y < 0).nonzero(as_tuple=True)[0]
    le_idx = (y > 0).nonzero(as_tuple=True)[0]
    len_g, len_le = len(g_idx), len(le_idx)
    a, a_ct = 0, 0.0
    for idx in list(g_idx) + list(le_idx):
        v = x[idx] + eps if y[idx] < 0 else x[idx]
        v_ct = 0.0
        for c in g_idx:
            v_ct += (v > x[c]).float() / len_g
        for c in le_idx:
            v_ct += (v <= x[c]).float() / len_le
        if v_ct > a_ct + 1e-12:
            a, a_ct = v, v_ct
    return float(a)


@pytest.mark.parametrize("seed", range(4))
def test_bf_threshold_matches_reference_loops(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(40, generator=g, dtype=DT)
    y = torch.randint(-1, 2, (40,), generator=g).to(DT)
    if seed == 3:
        y = y.clamp_min(0)  # positive-only labels (Object-ME style masks)
    assert bf_threshold(x, y).item() == pytest.approx(bf_reference(x, y), abs=1e-12)


def test_bf_threshold_separates_and_handles_empty():
    x = torch.tensor([0.1, 0.2, 0.7, 0.9])
    y = torch.tensor([-1.0, -1.0, 1.0, 1.0])
    assert bf_threshold(x, y).item() == pytest.approx(0.2 + 1e-4)  # first full separator: negatives' candidate
    assert bf_threshold(x, torch.zeros(4)).item() == 0.0
    assert bf_threshold(x, torch.tensor([0.0, 0.0, 1.0, 1.0])).item() == pytest.approx(0.7)  # min positive


def test_res_visual_hand_value():
    s = torch.tensor([[[0.0, 1 / 3], [2 / 3, 1.0]]], dtype=DT)
    a = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]], dtype=DT)
    terms = res_visual_loss(s, a, torch.tensor([True]), imputed=a, eta=0.1, tanh_scale=5.0)
    # positive-only labels: threshold = min saliency on positives = 2/3; effective area = the two positives
    assert terms.a.item() == pytest.approx(2 / 3)
    thr = (abs(math.tanh(0.0) - 1) + abs(math.tanh(5 / 3) - 1)) / 2
    assert terms.threshold.item() == pytest.approx(thr)
    assert terms.imputation.item() == pytest.approx(1 / 6)
    assert terms.visual.item() == pytest.approx(max(thr - 0.1, 0) + 1 / 6)
    # the slack swallows a small threshold loss entirely
    assert res_visual_loss(s, a, torch.tensor([True]), imputed=a, eta=10.0).visual.item() == pytest.approx(1 / 6)


def test_gaussian_imputation_hand_value():
    mask = torch.zeros(1, 6, 6, dtype=DT)
    mask[0, :2, :2] = 1.0  # -> 3x3 grid [[1,0,0],[0,0,0],[0,0,0]]
    lo = torch.tensor([[1.0, 0.5, 0.0], [0.5, 0.25, 0.0], [0.0, 0.0, 0.0]], dtype=DT) * 0.25 / (0.25 + 1e-6)
    expected = F.interpolate(lo[None, None], size=(6, 6), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(gaussian_imputation(mask, (3, 3)), expected)


def test_res_learnable_imputation_shape_and_hand_value():
    imp = ResImputation(ratio=2).double()  # Conv2d(1, 1, 4, stride 2, padding 1): 8x8 -> 4x4
    assert imp.conv.kernel_size == (4, 4) and imp.conv.stride == (2, 2)
    with torch.no_grad():
        imp.conv.weight.fill_(1.0)
        imp.conv.bias.zero_()
    mask = torch.zeros(1, 8, 8, dtype=DT)
    mask[0, 0, 0] = 0.7  # binarised to 1: covered by the windows of output cells (0,0) only
    out = imp(mask, (4, 4))
    lo = torch.zeros(4, 4, dtype=DT)
    lo[0, 0] = 1.0 / (1.0 + 1e-6)
    expected = F.interpolate(lo[None, None], size=(8, 8), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out, expected)


def test_res_l_requires_setup():
    model, batch, _ = fixed_case()
    with pytest.raises(RuntimeError, match="setup_res_l"):
        res_l_loss(model, batch, None, {"backend": "reference"})
    with pytest.raises(ValueError, match="image size"):
        setup_res_l(model, None)


# ----------------------------------------------------------------------------- RRR
class LinearClf(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2).double()
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.0, 1.0, 1.0, 1.0]]))
            self.fc.bias.copy_(torch.tensor([math.log(3.0), 0.0]))

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_rrr_hand_value():
    clf = LinearClf()
    image = torch.zeros(2, 1, 2, 2, dtype=DT)  # logits = bias -> p = [3/4, 1/4]
    label = torch.tensor([0, 1])
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]], dtype=DT)
    has_mask = torch.tensor([True, False])
    out = rrr_terms(clf, image, label, mask, has_mask, lam=1000.0, score="reference")
    # d/dx sum_k log p_k = W^T (1 - K p) = -0.5 W0 + 0.5 W1 = [-0.5, -0.5, 0.5, 1]; pixel 0 is relevant
    penalty = (0.25 + 0.25 + 1.0) / 2  # divided by the batch size
    ce = (-math.log(0.75) - math.log(0.25)) / 2
    assert out["visual"].item() == pytest.approx(penalty)
    assert out["total"].item() == pytest.approx(ce + 1000.0 * penalty)


def test_rrr_share_score_hand_value_scale_invariant_and_checked():
    clf = LinearClf()
    image = torch.zeros(2, 1, 2, 2, dtype=DT)
    label = torch.tensor([0, 1])
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]], dtype=DT)
    has_mask = torch.tensor([True, False])
    out = rrr_terms(clf, image, label, mask, has_mask, lam=1.0, score="share")
    # gradient [-0.5, -0.5, 0.5, 1] as above: 1.5 of its 1.75 squared mass lies outside the mask; / batch size 2
    assert out["visual"].item() == pytest.approx((1.5 / 1.75) / 2)
    with torch.no_grad():  # shrinking every input gradient 10x lowers the reference penalty 100x, not the share
        clf.fc.weight.mul_(0.1)
    ref = rrr_terms(clf, image, label, mask, has_mask, lam=1.0, score="reference")["visual"].item()
    assert rrr_terms(clf, image, label, mask, has_mask, lam=1.0, score="share")["visual"].item() == pytest.approx(
        (1.5 / 1.75) / 2)
    assert ref == pytest.approx(0.01 * (0.25 + 0.25 + 1.0) / 2)
    with pytest.raises(ValueError, match="rrr_score"):
        rrr_terms(clf, image, label, mask, has_mask, score="ratio")


@pytest.mark.parametrize("score", ["reference", "share"])
def test_rrr_penalty_trains_the_weights(score):
    clf = LinearClf()
    image = torch.zeros(1, 1, 2, 2, dtype=DT)
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]], dtype=DT)  # (a mask of zeros makes the share a constant 1)
    x = image.requires_grad_(True)
    penalty = rrr_penalty(input_gradients(clf(x), x), mask, torch.tensor([True]), score)
    (g,) = torch.autograd.grad(penalty, clf.fc.weight)  # the penalty alone: needs the double backward
    assert g.abs().sum() > 0


# ----------------------------------------------------------------------------- CDEP
def test_cd_linear_hand_value_and_penalty():
    lin = nn.Linear(2, 1).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 1.0]]))
        lin.bias.fill_(3.0)
    rel, irrel = contextual_decomposition(nn.Sequential(nn.Flatten(), lin), torch.tensor([[[[1.0, 2.0]]]], dtype=DT),
                                          torch.tensor([[[1.0, 0.0]]], dtype=DT))
    # Wβ = 1, Wγ = 2, bias 3 shared 1:2 -> β = 2, γ = 4
    assert rel.item() == pytest.approx(2.0) and irrel.item() == pytest.approx(4.0)
    pen = cdep_penalty(rel, irrel, torch.tensor([True]), "share")
    assert pen.item() == pytest.approx(1 / (1 + math.exp(2.0)))


def test_cd_relu_and_maxpool_rules():
    r, i = cd_relu(torch.tensor([-1.0, 2.0]), torch.tensor([3.0, -1.0]))
    assert r.tolist() == [0.0, 2.0] and i.tolist() == [2.0, -1.0]
    rel = torch.tensor([[[[1.0, 5.0], [0.0, 0.0]]]])
    irrel = torch.tensor([[[[4.0, -1.0], [0.0, 0.0]]]])  # sum [[5, 4], ...]: argmax is the top-left cell
    pr, pi = cd_maxpool(rel, irrel, nn.MaxPool2d(2))
    assert pr.item() == 1.0 and pi.item() == 4.0


def test_cd_symmetric_relu_splits_interactions_and_sums():
    r, i = cd_relu(torch.tensor([-1.0, 2.0]), torch.tensor([3.0, -1.0]), "symmetric")
    # [-1, 3]: relu(2) = 2 split as ½(relu(-1) + 2 − relu(3)) = −0.5 and 2.5; [2, -1]: ½(2 + 1 − 0) = 1.5, −0.5
    assert r.tolist() == [-0.5, 1.5] and i.tolist() == [2.5, -0.5]


def test_cd_group_relu_charges_every_interaction_to_the_group():
    r, i = cd_relu(torch.tensor([-1.0, 2.0]), torch.tensor([3.0, -1.0]), "group")
    # γ' = relu(γ) = [3, 0]; β' = relu(β + γ) − γ' = [2 − 3, 1 − 0]
    assert r.tolist() == [-1.0, 1.0] and i.tolist() == [3.0, 0.0]


def test_cd_group_rule_charges_a_group_that_only_inhibits():
    """A corner that switches a digit unit off: the reference rule gives the corner relu(β) = 0 and charges it
    nothing; the group rule charges it the whole change, and γ is the net run on the rest alone (no biases)."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(2, 1, bias=False), nn.ReLU(), nn.Linear(1, 1, bias=False)).double()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, -0.5]]))  # digit pixel +1, corner pixel −0.5
        net[3].weight.fill_(2.0)
    x = torch.tensor([[[[3.0, 2.0]]]], dtype=DT)  # digit 3, corner 2: relu(3 − 1) = 2, logit 4
    corner = torch.tensor([[[0.0, 1.0]]], dtype=DT)
    ref = contextual_decomposition(net, x, corner)
    grp = contextual_decomposition(net, x, corner, "group")
    assert ref[0].item() == 0.0 and ref[1].item() == pytest.approx(4.0)
    assert grp[0].item() == pytest.approx(-2.0) and grp[1].item() == pytest.approx(6.0)  # 6 = net(digit alone)
    torch.manual_seed(0)
    deep = nn.Sequential(nn.Flatten(), nn.Linear(16, 8, bias=False), nn.ReLU(), nn.Linear(8, 8, bias=False),
                         nn.ReLU(), nn.Linear(8, 3, bias=False)).double()
    x, blob = torch.randn(4, 1, 4, 4, dtype=DT), (torch.rand(4, 4, 4) > 0.5).to(DT)
    with torch.no_grad():
        rel, irrel = contextual_decomposition(deep, x, blob, "group")
        torch.testing.assert_close(irrel, deep((1 - blob[:, None]) * x))
        torch.testing.assert_close(rel + irrel, deep(x))


def test_cdep_centred_score_ignores_a_common_logit_shift():
    # the reference share can be met by raising every logit's γ (the measured failure on DecoyMNIST's mlp);
    # the centred score only sees what the group does to the logits' differences
    rel, irrel = torch.tensor([[1.0, -1.0, 0.0]], dtype=DT), torch.zeros(1, 3, dtype=DT)
    has = torch.tensor([True])
    share = lambda r, i: cdep_penalty(r, i, has, "share").item()  # noqa: E731
    assert share(rel, irrel + 20) < 1e-8 < share(rel, irrel)
    centred = cdep_penalty(rel, irrel, has, "centred_l1").item()
    assert centred == pytest.approx(2 / 3)
    assert cdep_penalty(rel + 5, irrel + 20, has, "centred_l1").item() == pytest.approx(centred)
    with pytest.raises(ValueError, match="cdep_score"):
        cdep_loss(nn.Sequential(), {"image": torch.zeros(1, 3, 4, 4), "label": torch.zeros(1, dtype=torch.long),
                                    "mask": torch.ones(1, 4, 4), "has_mask": torch.ones(1, dtype=torch.bool)},
                  None, {"method_args": {"cdep_score": "l2"}})


@pytest.mark.parametrize("train", [False, True])
def test_cd_sums_to_resnet18_logits(train):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    net = resnet18(num_classes=5).double()
    with torch.no_grad():  # non-trivial running statistics and BN affine parameters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    net.train(train)
    x = torch.randn(3, 3, 32, 32, dtype=DT)
    blob = (torch.rand(3, 32, 32, dtype=DT) > 0.5).to(DT)
    with torch.no_grad():
        logits = net(x)
        rel, irrel = contextual_decomposition(net, x, blob)
    torch.testing.assert_close(rel + irrel, logits, rtol=1e-8, atol=1e-8)
    # all of the input in one group: that group gets everything but (shared) biases
    with torch.no_grad():
        rel0, irrel0 = contextual_decomposition(net, x, torch.zeros(3, 32, 32, dtype=DT))
    assert rel0.abs().max() == 0


def test_cdep_rejects_vit_and_unknown_layers():
    from torchvision.models import VisionTransformer

    class ViTClf(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=1, hidden_dim=8,
                                              mlp_dim=8, num_classes=2)

        def forward(self, x):
            return Out(self.backbone(x), x)

        def gradcam_gradients(self, out, target):
            raise AssertionError("not reached")

    batch = {"image": torch.rand(1, 3, 16, 16), "label": torch.tensor([0]), "mask": torch.ones(1, 16, 16),
             "has_mask": torch.tensor([True])}
    with pytest.raises(CDUnsupported, match="resnet18"):
        cdep_loss(ViTClf(), batch)
    with pytest.raises(CDUnsupported, match="GELU"):
        cd_module(nn.GELU(), torch.zeros(1), torch.zeros(1))


# ----------------------------------------------------------------------------- training decreases each loss
class TinyCNN(nn.Module):
    """conv(stride 2) -> relu -> conv -> relu (the Grad-CAM layer, 4x4 on 8x8 images) -> GAP -> linear."""

    def __init__(self, num_classes=2):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)
        self.net = nn.Sequential(self.body, self.pool, nn.Flatten(), self.fc)  # the CD view for CDEP

    def cd_network(self):
        return self.net, (lambda image: image)

    def forward(self, image):
        acts = self.body(image)
        return Out(self.fc(self.pool(acts).flatten(1)), acts)

    def gradcam_gradients(self, out, target):
        return gap_linear_gradcam_gradients(self.fc.weight, target, tuple(out.activations.shape[-2:]))


def toy_batch(n=16, seed=0):
    """Class = which quadrant holds a bright square; a decoy colour cue covers the opposite corner; the mask marks
    the square. Half of the samples are annotated."""
    g = torch.Generator().manual_seed(seed)
    label = torch.arange(n) % 2
    image = 0.1 * torch.rand(n, 3, 8, 8, generator=g)
    mask = torch.zeros(n, 8, 8)
    for b in range(n):
        r = 0 if label[b] == 0 else 4
        image[b, :, r:r + 4, r:r + 4] += 0.8
        mask[b, r:r + 4, r:r + 4] = 1.0
        o = 4 - r
        image[b, label[b], o:o + 4, o:o + 4] += 0.5  # decoy in the irrelevant region
    has_mask = torch.arange(n) < n // 2 + 2
    return {"image": image, "label": label, "mask": mask, "has_mask": has_mask}


@pytest.mark.parametrize("method", ["gradia", "haics", "res-g", "res-l", "rrr", "cdep"])
def test_each_loss_decreases_on_a_tiny_problem(method, one_thread):
    """Start from a CE-only model (it uses the decoy and ignores the masks), then train with the method: its
    explanation term must fall by more than half in 40 steps."""
    torch.manual_seed(0)
    model = TinyCNN()
    batch = toy_batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        loss = F.cross_entropy(model(batch["image"]).logits, batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    fn = get_method(method)
    config = {"backend": "reference", "image_size": 8}
    setup = fn.resolve("setup")
    if setup is not None:
        setup(model, config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    visual0 = fn(model, batch, None, config)["visual"].item()
    assert visual0 > 0.1
    for _ in range(40):
        out = fn(model, batch, None, config)
        opt.zero_grad()
        out["total"].backward()
        opt.step()
    last = fn(model, batch, None, config)
    assert torch.isfinite(last["total"])
    assert last["visual"].item() < 0.5 * visual0, (method, visual0, last["visual"].item())


# ----------------------------------------------------------------------------- the project's classifiers
def _config(**kw):
    from megl.config import Config

    return Config(**{"image_size": 32, "backbone": "resnet18", "saliency_backend": "reference",
                     "clip_model": "tiny-random", "llm": "tiny-random", **kw})


@pytest.mark.parametrize("maxpool,stride,train", [(True, 2, False), (False, 1, True), (True, 1, True)])
def test_cd_sums_to_megl_resnet18_classifier_logits(maxpool, stride, train):
    from megl.losses.cdep import _resnet_and_input
    from megl.models import build_classifier

    torch.manual_seed(0)
    clf = build_classifier(_config(resnet_stem_maxpool=maxpool, resnet_layer4_stride=stride), 3).double().train(train)
    image = torch.rand(2, 3, 32, 32, dtype=DT)
    with torch.no_grad():
        logits = clf(image).logits
        net, x = _resnet_and_input(clf, image)
        rel, irrel = contextual_decomposition(net, x, (torch.rand(2, 32, 32) > 0.5).to(DT))
    torch.testing.assert_close(rel + irrel, logits, rtol=1e-8, atol=1e-8)


def test_cdep_on_megl_vit_is_a_clear_error():
    from megl.models import build_classifier

    clf = build_classifier(_config(backbone="vit_b_16", vit_patch_size=16, vit_layers=1, vit_heads=1, vit_hidden=8,
                                   vit_mlp=8), 2)
    batch = {"image": torch.rand(1, 3, 32, 32), "label": torch.tensor([0]), "mask": torch.ones(1, 32, 32),
             "has_mask": torch.tensor([True])}
    with pytest.raises(CDUnsupported, match="VisionTransformer.*--backbone resnet18"):
        cdep_loss(clf, batch, None, _config())


def test_res_l_setup_on_megl_resnet18():
    from megl.models import build_classifier

    clf = build_classifier(_config(image_size=64, resnet_stem_maxpool=False, resnet_layer4_stride=2), 2)
    module = setup_res_l(clf, _config(image_size=64))
    assert clf.res_imputation is module and setup_res_l(clf, _config(image_size=64)) is module
    assert clf.grid == (4, 4)
    assert module.ratio == 16 and module.conv.kernel_size == (32, 32)  # 64 px -> 4x4 layer4 grid
    assert any(n.startswith("res_imputation.") for n, _ in clf.named_parameters())


# ----------------------------------------------------------------------------- LLaVA / Fine-tune-CoT
def test_match_class_and_parse_answer():
    from megl.models.llm_classifier import match_class, parse_answer

    names = ["red circle", "red square", "blue circle", "circle"]
    assert match_class("Red Circle.", names) == 0  # exact after normalisation
    assert match_class("it is a blue circle", names) == 2  # longest contained name wins over "circle"
    assert match_class("a circle", names) == 3
    assert match_class("red squar", names) == 1  # close match
    assert match_class("a dog", names) == -1
    assert match_class("a red square next to a red circle", names) == 1  # equal length: the earliest
    assert parse_answer("ft-cot", "the shape is round ---> red circle") == ("red circle", "the shape is round")
    assert parse_answer("ft-cot", "no separator here") == ("no separator here", "no separator here")
    assert parse_answer("llava", " red circle ") == ("red circle", "")


@pytest.fixture(scope="module")
def tiny_llm_setup():
    from megl.data import synthetic
    from megl.models import train_tokenizer

    tr = synthetic.make_splits(synthetic.SyntheticConfig(n_train=16, n_val=4, n_test=4, image_size=32))["train"]
    items = [tr[i] for i in range(4)]
    batch = {"image": torch.stack([it["image"] for it in items]), "label": torch.tensor([it["label"] for it in items]),
             "rationale": [it["rationale"] for it in items], "mask": torch.stack([it["mask"] for it in items]),
             "has_mask": torch.tensor([bool(it["has_mask"]) for it in items])}
    tok = train_tokenizer([tr[i]["rationale"] for i in range(len(tr))], tr.class_names, 400)
    return tr.class_names, tok, batch


@pytest.mark.parametrize("mode", ["llava", "ft-cot"])
def test_llm_classifier_trains_on_answers_only(mode, tiny_llm_setup, one_thread):
    from megl.models.llm_classifier import LLMClassifier, answer_text, ft_cot_loss, llava_loss

    names, tok, batch = tiny_llm_setup
    fn = get_method(mode)
    assert fn.kind == "llm" and fn.resolve("loss") is {"llava": llava_loss, "ft-cot": ft_cot_loss}[mode]
    config = _config(method=mode, clip_image_size=32)
    model = fn.resolve("build_model")(config, names, tok)
    assert isinstance(model, LLMClassifier) and model.mode == mode
    # labels cover exactly the answer tokens and </s>
    V = model.visual_tokens(batch["image"])
    answers = model.answers_for(batch["label"], batch["rationale"])
    assert answers[0] == answer_text(mode, names[int(batch["label"][0])], batch["rationale"][0])
    _, _, labels = model.prompts.training_batch(model.llm.get_input_embeddings(), V, None, answers)
    assert sum(x != -100 for x in labels[0]) == len(tok(" " + answers[0], add_special_tokens=False)["input_ids"]) + 1
    groups = model.parameter_groups()
    assert groups["projector"] and groups["lora"]
    opt = torch.optim.Adam(groups["projector"] + groups["lora"], lr=3e-3)
    first = fn(model, batch, None, config)["total"].item()
    for _ in range(8):
        out = fn(model, batch, None, config)
        opt.zero_grad()
        out["total"].backward()
        opt.step()
    assert out["total"].item() < first
    pred = model.predict(batch["image"], max_new_tokens=4)
    assert pred.class_ids.shape == (4,) and len(pred.answers) == 4
    assert ((pred.class_ids >= -1) & (pred.class_ids < len(names))).all()
    with pytest.raises(TypeError, match="LLMClassifier"):
        fn(TinyCNN(), batch, None, config)

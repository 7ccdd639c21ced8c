"""Metrics on hand-made cases with known answers (classification, visual, faithfulness, CLIPScore)."""
import math

import numpy as np
import pytest
import torch

from megl.metrics import (
    classification_metrics, clip_scores, comprehensiveness_sufficiency, confusion_matrix, iou, pixel_scores,
    top_fraction_mask, visual_metrics,
)

# ---------------------------------------------------------------- classification


def test_macro_metrics_hand_computed():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 0, 2]
    # class 0: P 1/2 R 1/2 F1 1/2; class 1: P 2/3 R 1 F1 4/5; class 2: P 1 R 1/2 F1 2/3
    m = classification_metrics(y_true, y_pred)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["recall"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert confusion_matrix(y_true, y_pred).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_zero_division_counts_as_zero():
    # class 1 is never predicted: its precision 0/0 -> 0, recall 0, F1 0
    m = classification_metrics([0, 1], [0, 0])
    assert m["precision"] == pytest.approx((0.5 + 0) / 2)
    assert m["recall"] == pytest.approx((1 + 0) / 2)
    assert m["f1"] == pytest.approx((2 / 3 + 0) / 2)
    # an absent class listed in `labels` counts as 0 in the macro mean
    assert classification_metrics([0, 0], [0, 0], labels=[0, 1])["f1"] == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(5))
def test_macro_metrics_match_sklearn(seed):
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n, c = 50, 7
    y_true = rng.integers(0, c, n)
    y_pred = np.where(rng.random(n) < 0.4, y_true, rng.integers(0, c - 2, n))  # some classes rarely predicted
    ours = classification_metrics(torch.from_numpy(y_true), torch.from_numpy(y_pred))
    assert ours["accuracy"] == pytest.approx(sk.accuracy_score(y_true, y_pred))
    for key, fn in (("precision", sk.precision_score), ("recall", sk.recall_score), ("f1", sk.f1_score)):
        assert ours[key] == pytest.approx(fn(y_true, y_pred, average="macro", zero_division=0)), key
    labels = list(range(c + 2))
    ours = classification_metrics(y_true.tolist(), y_pred.tolist(), labels=labels)
    assert ours["f1"] == pytest.approx(sk.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))


def test_classification_rejects_float_predictions():
    with pytest.raises(ValueError, match="argmax"):
        classification_metrics([0, 1], torch.tensor([0.2, 0.8]))

# ---------------------------------------------------------------- visual


def test_iou_and_pixel_scores_known_masks():
    sal = torch.zeros(4, 4)
    sal[:2, :2] = 0.9          # 4 salient pixels
    sal[3, 3] = 0.49           # below threshold
    mask = torch.zeros(4, 4)
    mask[:2, :] = 1.0          # 8 annotated pixels, containing the salient ones
    s = pixel_scores(sal, mask)
    assert s["iou"].item() == pytest.approx(4 / 8)
    assert s["precision"].item() == pytest.approx(1.0)
    assert s["recall"].item() == pytest.approx(0.5)
    assert s["f1"].item() == pytest.approx(2 / 3)
    # disjoint maps
    assert iou(1 - mask, mask).item() == 0.0
    # a lower threshold takes in the 0.49 pixel (outside the mask): IoU 4/9
    assert iou(sal, mask, threshold=0.4).item() == pytest.approx(4 / 9)


def test_empty_maps_edge_cases():
    empty, full = torch.zeros(1, 3, 3), torch.ones(1, 3, 3)
    s = pixel_scores(empty, empty)
    assert s["iou"].item() == 1.0 and s["precision"].item() == 0.0 and s["f1"].item() == 0.0
    s = pixel_scores(empty, full)
    assert s["iou"].item() == 0.0 and s["recall"].item() == 0.0


def test_miou_only_over_annotated_samples():
    sal = torch.zeros(3, 2, 2)
    sal[0, 0, 0] = 1.0                      # sample 0: IoU 1/2 with mask row 0
    sal[1] = 1.0                            # sample 1: IoU 1 with a full mask
    mask = torch.zeros(3, 2, 2)
    mask[0, 0] = 1.0
    mask[1] = 1.0
    has_mask = torch.tensor([True, True, False])   # sample 2 (IoU 1 on empty maps) must not count
    m = visual_metrics(sal, mask, has_mask)
    assert m["n_annotated"] == 2
    assert m["miou"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["exp_precision"] == pytest.approx(1.0)
    assert m["exp_recall"] == pytest.approx((0.5 + 1.0) / 2)
    none = visual_metrics(sal, mask, torch.zeros(3, dtype=torch.bool))
    assert none["n_annotated"] == 0 and none["miou"] is None


def test_visual_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="upsample"):
        iou(torch.zeros(1, 2, 2), torch.zeros(1, 4, 4))

# ---------------------------------------------------------------- faithfulness


def _region_model(region):
    """p(class 1) = mean of channel 0 over `region`; p(class 0) = 1 - that."""
    def predict_proba(x):
        s = x[:, 0][:, region].mean(1)
        return torch.stack([1 - s, s], 1)
    return predict_proba


def test_comprehensiveness_of_image_blind_model_is_zero():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(5), 0)
    predict = lambda x: probs.expand(x.shape[0], -1)  # noqa: E731
    images, sal = torch.rand(3, 3, 8, 8), torch.rand(3, 8, 8)
    out = comprehensiveness_sufficiency(predict, images, sal)
    assert torch.equal(out["comprehensiveness"], torch.zeros(3))
    assert torch.equal(out["sufficiency"], torch.zeros(3))


def test_comprehensiveness_sufficiency_known_answer():
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[:2, :2] = True                                  # the 4 pixels the model looks at
    images = torch.zeros(1, 3, 4, 4)
    images[:, :, region] = 1.0                             # p(class 1 | x) = 1
    good = region.float()[None]                            # the map points at the evidence
    fr = (0.125, 0.25, 0.5)                                # 2, 4 and 8 pixels
    out = comprehensiveness_sufficiency(_region_model(region), images, good, fractions=fr, baseline="zero")
    assert out["target"].item() == 1
    # k=2 px: half the evidence removed / kept -> 0.5 / 0.5; k=4 and 8 px: all of it -> 1 / 0
    assert out["comprehensiveness@0.125"].item() == pytest.approx(0.5)
    assert out["sufficiency@0.125"].item() == pytest.approx(0.5)
    assert out["comprehensiveness"].item() == pytest.approx((0.5 + 1 + 1) / 3)
    assert out["sufficiency"].item() == pytest.approx((0.5 + 0 + 0) / 3)
    bad = 1 - good                                         # the map points everywhere but the evidence
    out = comprehensiveness_sufficiency(_region_model(region), images, bad, fractions=fr, baseline="zero")
    assert out["comprehensiveness"].item() == pytest.approx(0.0)
    assert out["sufficiency"].item() == pytest.approx(1.0)


def test_top_fraction_mask_counts_and_mean_baseline():
    sal = torch.arange(100.0).reshape(1, 10, 10)
    top = top_fraction_mask(sal, 0.05)
    assert top.sum() == 5 and top.reshape(-1)[-5:].all()       # the 5 largest values
    assert top_fraction_mask(sal, 0.001).sum() == 1             # at least one pixel
    # "mean" baseline: removing pixels of a constant image changes nothing
    const = torch.full((1, 3, 10, 10), 0.3)
    region = torch.ones(10, 10, dtype=torch.bool)
    out = comprehensiveness_sufficiency(_region_model(region), const, sal)
    assert out["comprehensiveness"].abs().item() < 1e-6 and out["sufficiency"].abs().item() < 1e-6

# ---------------------------------------------------------------- CLIPScore


class _KnownClip(torch.nn.Module):
    """encode_image / encode_text return fixed vectors: image i -> img[i], text t -> txt[t]."""

    def __init__(self, img, txt):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))
        self.img, self.txt = img, txt

    def encode_image(self, x):
        return self.img[x[:, 0, 0, 0].round().long()]

    def encode_text(self, ids):
        return self.txt[ids]


def test_clipscore_known_embeddings():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    txt = torch.tensor([[3.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    model = _KnownClip(img, txt)
    images = torch.arange(3.0)[:, None, None, None].expand(3, 3, 2, 2)   # pixel value = image index
    scores = clip_scores(model, lambda texts: torch.tensor([int(t) for t in texts]), images,
                         ["0", "1", "2"], preprocessed=True)
    # cos = 1, -1 (clamped to 0), 1/sqrt(2)
    assert scores.tolist() == pytest.approx([2.5, 0.0, 2.5 / math.sqrt(2)])


def _word_tokenizer(words, context_length=6):
    vocab = {w: i for i, w in enumerate(["<pad>", *words, "<eot>"])}   # <eot> has the largest id (argmax pooling)

    def tokenize(texts):
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [vocab[w] for w in t.split()] + [vocab["<eot>"]]
            out[i, :len(ids)] = torch.tensor(ids)
        return out
    return tokenize, len(vocab)


@pytest.mark.slow
def test_clipscore_prefers_matching_pairs_tiny_trained_clip():
    """A tiny open_clip CLIP trained contrastively on 4 colour/text pairs scores matched pairs above shuffled."""
    open_clip = pytest.importorskip("open_clip")
    from megl.metrics import preprocess_for_clip
    torch.manual_seed(0)
    colours = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0)}
    tokenizer, vocab_size = _word_tokenizer(["a", "picture", *colours])
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
        text_cfg=open_clip.CLIPTextCfg(context_length=6, vocab_size=vocab_size, width=32, heads=2, layers=1),
    )
    images = torch.stack([torch.tensor(c, dtype=torch.float)[:, None, None].expand(3, 24, 24)
                          for c in colours.values()])                      # 24 px: resized to 16 inside
    texts = [f"a {name} picture" for name in colours]
    x, ids, target = preprocess_for_clip(images, model), tokenizer(texts), torch.arange(4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        img = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(ids), dim=-1)
        logits = 10 * img @ txt.T
        loss = (torch.nn.functional.cross_entropy(logits, target)
                + torch.nn.functional.cross_entropy(logits.T, target)) / 2
        if loss.item() < 0.05:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    matched = clip_scores(model, tokenizer, images, texts)
    shuffled = clip_scores(model, tokenizer, images, texts[1:] + texts[:1])
    assert (matched > shuffled + 0.5).all(), (matched, shuffled)
    assert ((matched >= 0) & (matched <= 2.5)).all()

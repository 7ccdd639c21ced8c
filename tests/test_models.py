"""MEGL model: classifier taps, Grad-CAM gradients, SDTG prompt/labels, both gradient paths of L_text, generation,
checkpoint state and the loss switches."""
from __future__ import annotations

import copy

import pytest
import torch

from megl.config import Config
from megl.data import collate, mean_mask_prior
from megl.models import build_model, train_tokenizer
from megl.models.conversation import IGNORE_INDEX as IGNORE
from megl.models.sdtg import greedy_generate
from megl.runs import make_splits

TINY = dict(clip_model="tiny-random", llm="tiny-random", image_size=32, clip_image_size=32, tiny_clip_width=32, tiny_llm_hidden=32, tokenizer_vocab_size=300,
            max_new_tokens=6, resnet_stem_maxpool=True,  # a 2x2 map, as small as these tests need
            synthetic={"n_train": 12, "n_val": 4, "n_test": 4, "num_classes": 3,
                                         "mask_fraction": 0.5})
TINY_VIT = dict(backbone="vit_b_16", vit_patch_size=8, vit_layers=2, vit_heads=2, vit_hidden=32, vit_mlp=64)


def _setup(**overrides):
    cfg = Config(**{**TINY, **overrides})
    splits = make_splits(cfg)
    train = splits["train"]
    tok = train_tokenizer([t for r in train.records for t in r.references], train.class_names, cfg.tokenizer_vocab_size)
    model = build_model(cfg, train.class_names, tok)
    batch = collate([train.expanded(False)[i] for i in range(6)])
    return model, batch, mean_mask_prior(train)


@pytest.fixture(scope="module")
def resnet():
    return _setup()


@pytest.fixture(scope="module")
def vit():
    model, batch, prior = _setup(**TINY_VIT)
    with torch.no_grad():  # torchvision zero-initialises the ViT head (all Grad-CAM gradients 0): act as if trained
        model.classifier.net.heads.head.weight.normal_(0, 0.5)
    return model, batch, prior


def test_resnet_taps_and_closed_form_gradients_match_autograd(resnet):
    model, batch, _ = resnet
    clf = model.classifier
    out = clf(batch["image"])
    B = batch["image"].shape[0]
    assert out.logits.shape == (B, 3)
    assert out.activations.shape == (B, 512, 2, 2)  # 32 px with the stem max-pool, layer4 stride 1: /16
    assert out.features.shape == (B, 4, 512)
    target = batch["label"]
    closed = clf.gradcam_gradients(out, target)
    auto = torch.autograd.grad(out.logits.gather(1, target[:, None]).sum(), out.activations)[0]
    torch.testing.assert_close(closed, auto, rtol=1e-5, atol=1e-7)


def test_resnet_default_map_is_4x4_at_32px():
    from megl.config import PRESETS
    from megl.models import build_classifier

    for overrides, size, grid in [({}, 32, (4, 4)), (dict(resnet_stem_maxpool=True), 64, (4, 4)),
                                  (dict(resnet_stem_maxpool=True, resnet_layer4_stride=2), 64, (2, 2)),
                                  (dict(resnet_stem_maxpool=False, resnet_layer4_stride=2), 64, (4, 4)),
                                  ({k: PRESETS["paper-resnet18"][k] for k in ("resnet_stem_maxpool", "resnet_layer4_stride")},
                                   224, (7, 7))]:
        clf = build_classifier(Config(image_size=size, **overrides), 2)
        with torch.no_grad():
            assert clf(torch.rand(1, 3, size, size)).activations.shape[-2:] == grid == clf.grid, overrides


def test_vit_taps_have_nonzero_gradients_and_double_backward(vit):
    model, batch, _ = vit
    clf = model.classifier
    out = clf(batch["image"])
    assert out.activations.shape == (6, 32, 4, 4)  # 32 px / patch 8, CLS dropped
    assert out.features.shape == (6, 16, 32)
    g = clf.gradcam_gradients(out, batch["label"])
    assert g.shape == out.activations.shape and g.abs().sum() > 0 and g.requires_grad
    # second order: a function of the gradients reaches the head's weights
    (w_grad,) = torch.autograd.grad(g.pow(2).sum(), clf.net.heads.head.weight)
    assert w_grad.abs().sum() > 0


def test_saliency_is_normalised_and_predicted_class_by_default(vit):
    model, batch, _ = vit
    model.eval()
    with torch.no_grad():  # ViT Grad-CAM must still work: explain() enables autograd itself
        logits, sal = model.explain(batch["image"])
    assert sal.saliency.shape == (6, 32, 32)
    assert float(sal.saliency.min()) >= 0 and float(sal.saliency.max()) <= 1 + 1e-6
    pred = logits.argmax(1)
    torch.testing.assert_close(model.saliency(batch["image"], pred).saliency, sal.saliency)


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_explain_forward_gives_the_training_forwards_saliency(name, request):
    # explain_forward keeps only the graph Grad-CAM needs (none for ResNet18's closed form; the last block for
    # ViT); its saliency must be the one of the full training-mode graph.
    model, batch, _ = request.getfixturevalue(name)
    model.eval()
    clf, x = model.classifier, batch["image"]
    full = clf(x)
    target = full.logits.argmax(1)
    want = model.gradcam(full, x, target, create_graph=False).saliency
    lean = clf.explain_forward(x)
    torch.testing.assert_close(lean.logits, full.logits, rtol=1e-5, atol=1e-6)
    if name == "resnet":
        assert lean.logits.grad_fn is None and not lean.activations.requires_grad
    else:  # the activations are a leaf: nothing below them is differentiated
        assert lean.activations.is_leaf and lean.activations.requires_grad
    torch.testing.assert_close(model.explain(x)[1].saliency, want, rtol=1e-5, atol=1e-6)


def test_prompt_labels_cover_only_the_rationale(resnet):
    model, batch, _ = resnet
    embed = model.llm.get_input_embeddings()
    V = torch.zeros(2, 4, embed.weight.shape[1])
    rationales = ["a red circle in the center", "it has four right angles"]
    names = [model.class_names[0], model.class_names[1]]
    inputs, mask, labels = model.prompts.training_batch(embed, V, names, rationales)
    assert inputs.shape[:2] == mask.shape == labels.shape
    for b in range(2):
        kept = labels[b][labels[b] != IGNORE].tolist()
        assert kept[-1] == model.tokenizer.eos_token_id
        assert model.tokenizer.decode(kept[:-1]).strip() == rationales[b]
        n = int(mask[b].sum())
        assert (labels[b, n:] == IGNORE).all()
        # the prompt names the class
        head, tail = model.prompts._pieces(names[b])
        assert names[b] in model.tokenizer.decode(list(tail))



def test_lm_loss_on_labelled_positions_equals_hugging_faces(resnet):
    """causal_lm_loss runs the LM head on the rationale tokens only; loss and gradients must be those of
    llm(..., labels=labels).loss (the LoRA-wrapped model, as trained)."""
    from megl.models.llm import causal_lm_loss

    model, _, _ = resnet
    was_training = model.training
    model.eval()  # LoRA dropout off: both losses must see the same network
    embed = model.llm.get_input_embeddings()
    torch.manual_seed(0)
    V = torch.randn(2, 4, embed.weight.shape[1], requires_grad=True)
    inputs, mask, labels = model.prompts.training_batch(embed, V, model.class_names[:2],
                                                        ["a red circle in the center", "it has four right angles"])
    got, want = (f(inputs, mask, labels) for f in (lambda *a: causal_lm_loss(model.llm, *a),
                                                     lambda i, m, y: model.llm(inputs_embeds=i, attention_mask=m,
                                                                               labels=y).loss))
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    lora = [p for n, p in model.llm.named_parameters() if p.requires_grad]
    assert lora
    g_got = torch.autograd.grad(got, [V] + lora)
    g_want = torch.autograd.grad(want, [V] + lora)
    model.train(was_training)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)

def _text_grads(model, batch):
    clf = model.classifier
    clf.zero_grad(set_to_none=True)
    out = clf(batch["image"])
    sal = model.gradcam(out, batch["image"], batch["label"])
    model.text_loss(out, sal.masked, batch["label"], batch["rationale"]).backward()
    conv = clf.net.layer4[1].conv2.weight.grad
    fc = clf.net.fc.weight.grad
    return (0.0 if conv is None else float(conv.abs().sum())), (0.0 if fc is None else float(fc.abs().sum()))


def test_text_loss_reaches_classifier_through_features_and_through_saliency(resnet):
    model, batch, _ = resnet
    model.train()
    try:
        # V_I only: conv weights get gradient, fc (which enters only through Grad-CAM's weights) gets none
        model.text_through_features, model.text_through_saliency = True, False
        conv, fc = _text_grads(model, batch)
        assert conv > 0 and fc == 0
        # saliency only: I ⊙ Â -> CLIP -> W_A; Â depends on fc.weight (closed-form Grad-CAM) and on layer4
        model.text_through_features, model.text_through_saliency = False, True
        conv, fc = _text_grads(model, batch)
        assert conv > 0 and fc > 0
        model.text_through_features, model.text_through_saliency = False, False
        assert _text_grads(model, batch) == (0.0, 0.0)
        # sdtg_image_tokens=False: V = V_A, so with the saliency path cut nothing reaches the classifier, W_I
        # takes no gradient, and V no longer depends on the classifier's tokens
        model.text_through_features, model.text_through_saliency = True, False
        model.sdtg.image_tokens = False
        assert _text_grads(model, batch) == (0.0, 0.0)
        Z_A = torch.randn(2, model.clip_encoder.width, 4, 4)
        V = model.sdtg(torch.randn(2, 4, model.classifier.feature_dim), (2, 2), Z_A)
        torch.testing.assert_close(V, model.sdtg(torch.zeros(2, 4, model.classifier.feature_dim), (2, 2), Z_A))
    finally:
        model.text_through_features = model.text_through_saliency = model.sdtg.image_tokens = True


def test_sdtg_image_tokens_off_freezes_w_i():
    from megl.models.sdtg import SDTG

    assert not any(p.requires_grad for p in SDTG(8, 4, 6, image_tokens=False).W_I.parameters())
    assert all(p.requires_grad for p in SDTG(8, 4, 6).W_I.parameters())


def test_sdtg_coarser_grid_pools_the_finer_classifier_grid_to_clips():
    """sdtg_grid=coarser: a 6×6 classifier grid against CLIP's 2×2 gives 4 tokens, each the mean of its 3×3 block of
    classifier tokens plus CLIP's token of that cell; the default keeps one token per classifier cell."""
    import torch.nn.functional as F

    from megl.models.sdtg import SDTG

    torch.manual_seed(0)
    Z_I, Z_A = torch.randn(2, 36, 8, requires_grad=True), torch.randn(2, 4, 2, 2)
    sdtg = SDTG(8, 4, 6, grid="coarser")
    V = sdtg(Z_I, (6, 6), Z_A)
    blocks = F.avg_pool2d(Z_I.transpose(1, 2).reshape(2, 8, 6, 6), 3).flatten(2).transpose(1, 2)
    torch.testing.assert_close(V, sdtg.W_I(blocks) + sdtg.W_A(Z_A.flatten(2).transpose(1, 2)))
    V.sum().backward()
    assert Z_I.grad.abs().min() > 0  # every classifier token reaches the LLM
    assert SDTG(8, 4, 6)(Z_I, (6, 6), Z_A).shape == (2, 36, 6)
    assert sdtg(Z_I[:, :1], (1, 1), Z_A).shape == (2, 1, 6)  # a coarser classifier grid stays as it is
    with pytest.raises(ValueError, match="grid must be one of classifier, coarser"):
        SDTG(8, 4, 6, grid="fine")


def test_greedy_generation_with_cache_matches_full_recompute(resnet):
    model, batch, _ = resnet
    model.eval()
    embed = model.llm.get_input_embeddings()
    with torch.no_grad():
        V = torch.randn(2, 4, embed.weight.shape[1]) * 0.5
        inputs, mask, pos = model.prompts.prompt_batch(embed, V, [model.class_names[0], model.class_names[2]])
        fast = greedy_generate(model.llm, embed, inputs, mask, pos, 5, eos=-1)
        for b in range(2):  # one sample at a time, no cache, no padding
            n = int(mask[b].sum())
            x = inputs[b:b + 1, -n:]
            ids = []
            for _ in range(5):
                nxt = int(model.llm(inputs_embeds=x, use_cache=False).logits[0, -1].argmax())
                ids.append(nxt)
                x = torch.cat([x, embed(torch.tensor([[nxt]]))], dim=1)
            assert fast[b] == ids
    texts = model.generate_rationales(batch["image"][:3], max_new_tokens=4)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


def test_checkpoint_state_roundtrip_restores_outputs(resnet, tmp_path):
    from megl.runs import load_checkpoint, save_checkpoint

    model, batch, _ = resnet
    with torch.no_grad():
        for p in model.sdtg.parameters():
            p.add_(0.1)
    save_checkpoint(tmp_path, model.checkpoint_state_dict(), {"state": {}, "param_groups": []}, {}, {"epoch": 0})
    other = build_model(Config.from_dict({**model.config.to_dict(), "seed": 7}), model.class_names, model.tokenizer)
    assert not torch.equal(other.sdtg.W_I.weight, model.sdtg.W_I.weight)
    other.load_checkpoint_state_dict(load_checkpoint(tmp_path)[0])
    model.eval(), other.eval()
    with torch.no_grad():
        out_a, out_b = model.classifier(batch["image"]), other.classifier(batch["image"])
        torch.testing.assert_close(out_a.logits, out_b.logits, rtol=0, atol=0)
        sal = model.saliency(batch["image"])
        la = model.text_loss(out_a, sal.masked, batch["label"], batch["rationale"])
        lb = other.text_loss(out_b, sal.masked, batch["label"], batch["rationale"])
    assert float(la) == float(lb)
    with pytest.raises(ValueError, match="does not match"):
        other.load_checkpoint_state_dict({"nope": torch.zeros(1)})


@pytest.mark.parametrize("switches,present,absent", [
    (dict(), {"ce", "l1", "kl", "visual", "text"}, set()),
    (dict(use_consistency=False), {"ce", "l1", "visual", "text"}, {"kl"}),
    (dict(use_visual=False, use_consistency=False), {"ce", "text"}, {"l1", "kl", "visual"}),
    (dict(use_text=False, use_consistency=False), {"ce", "l1", "visual"}, {"kl", "text"}),
    (dict(method="baseline"), {"ce"}, {"l1", "kl", "visual", "text"}),
])
def test_loss_terms_follow_the_switches(resnet, switches, present, absent):
    model, batch, prior = resnet
    model.train()
    lambdas = {k: v for k, v in switches.items() if k != "method"}
    terms = model.loss(batch, prior, lambdas=lambdas, method=switches.get("method"))
    assert present <= set(terms) and not (absent & set(terms))
    cfg = model.config
    expected = (terms["ce"] + cfg.lambda_visual * terms.get("visual", 0) + cfg.lambda_text * terms.get("text", 0)
                + cfg.lambda_background * terms.get("background", 0))
    torch.testing.assert_close(terms["total"].detach(), torch.as_tensor(expected, dtype=torch.float32))
    if "kl" in terms:
        # the batch has annotated and unannotated samples: L1 and KL both active, each averaged over the batch
        assert batch["has_mask"].any() and not batch["has_mask"].all()
        assert terms["l1"] > 0 and terms["kl"] > 0


def test_visual_l1_outside_is_the_saliency_off_the_mask_only(resnet):
    """visual_l1=outside keeps the part of L1(Â, A) on A = 0 and drops the pull towards filling A: with a binary
    mask the two parts add up to the paper's L1, and samples without a mask contribute 0."""
    from megl.losses.megl import outside_l1

    model, batch, prior = resnet
    model.train()
    mask, has = batch["mask"], batch["has_mask"]
    assert ((mask == 0) | (mask == 1)).all() and has.any() and not has.all()
    out = model.classifier(batch["image"])
    sal = model.gradcam(out, batch["image"], batch["label"], mask, has, prior)
    outside = outside_l1(sal.saliency, mask, has)
    inside = torch.where(has, ((1 - sal.saliency) * mask).mean(dim=(1, 2)), torch.zeros(()))
    torch.testing.assert_close(outside + inside, sal.l1)
    assert (outside[~has] == 0).all() and (outside[has] > 0).all()
    terms = model.loss(batch, prior, lambdas={"visual_l1": "outside", "use_consistency": False, "use_text": False})
    torch.testing.assert_close(terms["l1"], outside.mean().detach())
    terms["total"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.classifier.parameters())
    model.zero_grad(set_to_none=True)


def test_consistency_without_prior_is_a_clear_error(resnet):
    model, batch, _ = resnet
    with pytest.raises(ValueError, match="prior"):
        model.loss(batch, None)


def test_lambdas_override_does_not_touch_model_config(resnet):
    model, batch, prior = resnet
    before = copy.deepcopy(model.config)
    terms = model.loss(batch, prior, lambdas={"lambda_text": 0.0})
    assert "text" not in terms and model.config == before


def test_classifier_weights_load_from_local_files(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import resnet18
    from torchvision.models.vision_transformer import VisionTransformer

    from megl.models import ResNet18Classifier, ViTClassifier

    ref = resnet18(num_classes=1000)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    clf = ResNet18Classifier(num_classes=5, image_size=64, weights=str(tmp_path / "r18.pth"), layer4_stride=1)
    assert torch.equal(clf.net.layer4[0].conv1.weight, ref.layer4[0].conv1.weight)
    assert clf.net.fc.out_features == 5
    # a ViT trained at 32 px loads at 64 px: position embeddings are interpolated
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    clf = ViTClassifier(3, 64, 8, 2, 2, 32, 64, weights=str(tmp_path / "vit.safetensors"))
    assert torch.equal(clf.net.conv_proj.weight, vit.conv_proj.weight)
    assert clf.net.encoder.pos_embedding.shape == (1, 65, 32)
    with pytest.raises(FileNotFoundError, match="classifier weights"):
        ResNet18Classifier(2, 64, weights=str(tmp_path / "missing.pth"))
    torch.save({"junk": torch.zeros(1)}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="resnet18 state dict"):
        ResNet18Classifier(2, 64, weights=str(tmp_path / "junk.pth"))


def test_llm_gradient_checkpointing_gives_the_same_gradients(resnet):
    model, batch, _ = resnet
    ckpt = build_model(Config.from_dict({**model.config.to_dict(), "gradient_checkpointing": True}),
                       model.class_names, model.tokenizer)
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt.llm.modules())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.llm.modules())
    ckpt.load_checkpoint_state_dict(model.checkpoint_state_dict())
    grads = []
    for m in (model, ckpt):
        m.eval()  # no dropout: the two runs must see the same computation
        m.zero_grad(set_to_none=True)
        with torch.no_grad():
            out = m.classifier(batch["image"])
            masked = m.saliency(batch["image"], batch["label"]).masked
        m.text_loss(out, masked, batch["label"], batch["rationale"]).backward()
        grads.append({n: p.grad.clone() for n, p in m.llm.named_parameters() if p.grad is not None})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)

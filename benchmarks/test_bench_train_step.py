"""Training step: what explanation guidance costs per optimiser step, same batch, same backbone, same model.

- ce: cross-entropy only (method "baseline": one classifier forward + backward);
- explanation-guided: CE + λ_vis·[L1 to the mask | KL to the prior] with the fused op (method "megl" with
  use_text=False): Grad-CAM gradients kept in the graph (closed form for ResNet, create_graph autograd for
  ViT), so the backward also runs through the saliency;
- megl: the full MEGL objective with SDTG: the masked image I⊙Â through the frozen CLIP, V_I + V_A into the
  LLM with LoRA, L_text back-propagated into the classifier (the embedded tiny CLIP / tiny Llama of
  megl.config's defaults: the 7B model of the paper is out of scope for a per-step benchmark).

A step = zero_grad, `model.loss(batch, prior, ...)["total"]`, backward, AdamW step over every trainable group.
Batch from megl.data's synthetic generator (half the batch with masks), fp32. Full mode: batch 16,
224 px (ResNet stem max-pool on: a 7x7 Grad-CAM map, the paper's setting); quick mode: batch 4, 64 px.
ViT-B/16 runs on CUDA only (on a CPU one 224 px batch-16 step takes tens of seconds).
"""
from __future__ import annotations

import pytest
import torch

import benchutil

models_mod = pytest.importorskip("megl.models", reason="megl.models is not built yet")

STEPS = ["ce", "explanation-guided", "megl"]
LABEL = {
    "ce": "cross-entropy step",
    "explanation-guided": "explanation-guided step (CE + visual loss, fused op)",
    "megl": "full MEGL step (CE + visual + SDTG text loss, tiny CLIP + tiny LLM)",
}
_CACHE: dict = {}


def _setting():
    return (4, 64) if benchutil.quick() else (16, 224)


def _build(backbone, device):
    key = (backbone, device)
    if key in _CACHE:
        return _CACHE[key]
    from megl.config import RANDOM_STANDINS, Config
    from megl.data import collate, mean_mask_prior
    from megl.data.synthetic import SyntheticConfig, make_splits
    from megl.models import build_model
    from megl.models.tokenizer import train_tokenizer

    B, S = _setting()
    # random stand-ins: the same architecture and cost as the pretrained ones, without pretraining per setting
    config = Config(backbone=backbone, image_size=S, device=device, resnet_stem_maxpool=S >= 224, batch_size=B,
                    **RANDOM_STANDINS)
    syn = SyntheticConfig(n_train=max(2 * B, 16), n_val=0, n_test=0, image_size=S, num_classes=8, mask_fraction=0.5)
    splits = make_splits(syn, expand_train_rationales=False)
    train = splits["train"]
    prior = mean_mask_prior(train).to(device)
    items = [train[i] for i in range(B)]
    # half the batch with masks, whatever the generator drew
    batch = collate(items)
    batch["has_mask"] = torch.arange(B) % 2 == 0
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    texts = [r for item in (train[i] for i in range(len(train))) for r in item["references"]]
    tok = train_tokenizer(texts, train.class_names, config.tokenizer_vocab_size)
    model = build_model(config, train.class_names, tokenizer=tok, device=device)
    model.train()
    groups = model.parameter_groups()
    params = [p for g in groups.values() for p in g]
    opt = torch.optim.AdamW(params, lr=1e-4)
    counts = {name: sum(p.numel() for p in g) for name, g in groups.items()}
    _CACHE[key] = (config, model, opt, batch, prior, counts)
    return _CACHE[key]


def _step_args(step):
    if step == "ce":
        return None, "baseline"
    if step == "explanation-guided":
        return {"use_text": False}, "megl"
    return None, "megl"


def _backbones():
    out = [pytest.param("resnet18", id="resnet18")]
    if benchutil.main_device() == "cuda":
        out.append(pytest.param("vit_b_16", id="vit_b_16"))
    return out


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("backbone", _backbones())
def test_train_step(benchmark, backbone, step):
    device = benchutil.main_device()
    config, model, opt, batch, prior, counts = _build(backbone, device)
    lambdas, method = _step_args(step)

    def fn():
        opt.zero_grad(set_to_none=True)
        terms = model.loss(batch, prior, lambdas, method)
        terms["total"].backward()
        opt.step()
        return terms

    terms = fn()  # the step is what it says it is
    expect = {"ce": {"ce"}, "explanation-guided": {"ce", "visual"}, "megl": {"ce", "visual", "text"}}[step]
    assert expect <= set(terms), (step, sorted(terms))
    if step != "megl":
        assert "text" not in terms

    B, S = batch["image"].shape[0], batch["image"].shape[-1]
    benchmark.group = f"train step {device} fp32 {backbone} B={B} {S}px"
    benchmark.extra_info.update(benchutil.base_info(
        device, torch.float32, suite="train_step", step=step, label=LABEL[step], model=backbone, batch=B,
        image_size=S, method=method, lambdas=lambdas, params=benchutil.count_params(model.classifier),
        trainable_params=counts, clip_model=config.clip_model, llm=config.llm,
        saliency_backend=config.saliency_backend, terms=sorted(terms),
    ))
    benchutil.measure(benchmark, fn, device, warmup=2, min_rounds=3)


def teardown_module(module):
    _CACHE.clear()

"""Pretraining of the embedded stand-ins for the paper's pretrained CLIP ViT-L/14 and Vicuna (issue 14).

MEGL's textual supervision trains Â through CLIP(I ⊙ Â) and the LLM's likelihood of the rationale; with random
frozen towers neither carries any signal. We cannot download the paper's weights, so the small towers are
pretrained on the run's *training split* only, before MEGL training, and frozen afterwards:

* `pretrain_clip`: open_clip's `CLIP` with open_clip's `ClipLoss` on (image, rationale) pairs. Each image is seen
  whole or, where the image has a human mask, as I ⊙ A: CLIP must read masked images, because that is what
  SDTG feeds it.
* `pretrain_llm`: the tiny `LlamaForCausalLM` as a conditional language model on the rationales, in the run's
  prompt template ("... USER: <image>\\n Why is this image classified as {class}? ... ASSISTANT: {rationale}</s>").
  The prompt names the class, so the model learns to carry the class from the question into the answer; the
  image slot holds the frozen pretrained CLIP's tokens of the image through a linear projector trained jointly
  (LLaVA's alignment stage), so it also learns to read what CLIP shows, such as where the object is. The
  projector initialises SDTG's W_A. Without a pretrained CLIP (clip_model=tiny-random) the slot holds noise.

Both run a fixed number of epochs (a function of the data, not of the clock, so results are reproducible) and
report what they learnt: the contrastive loss and zero-shot accuracy, or the rationale perplexity.
"""
from __future__ import annotations

import math
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megl.data.transforms import clip_preprocess

from .conversation import RATIONALE_QUESTION, PromptBuilder
from .llm import causal_lm_nll

# Chosen on the default synthetic data's validation split and the time budget (docs/standins.md).
CLIP_EPOCHS = 12
CLIP_BATCH = 64  # batch 64 reached a lower loss and higher val zero-shot than 128 at equal epochs
CLIP_LR = 3e-3
LLM_EPOCHS = 10  # val perplexity 10.17 / 1.69 / 1.56 at 3 / 10 / 20 epochs (default data; docs/standins.md)
# with rationale_prompt=image the class must be read from the slot: at 10 epochs one seed in three had not learnt
# to (greedy rationales name the val image's colour 0.94 / 0.80 / 0.31), at 20 all three do (quick data; standins.md)
LLM_EPOCHS_IMAGE_PROMPT = 20
LLM_BATCH = 64
LLM_LR = 3e-3
N_VISUAL_GRID = 4  # the image slot during LLM pretraining: the default classifier's 4×4 Grad-CAM grid
N_VISUAL = N_VISUAL_GRID ** 2


def _cosine_lr(opt: torch.optim.Optimizer, step: int, total: int, base: float, warmup: int) -> None:
    lr = base * (step + 1) / warmup if step < warmup else base * 0.5 * (1 + math.cos(math.pi * step / total))
    for g in opt.param_groups:
        g["lr"] = lr


def _article(name: str) -> str:
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


# ----------------------------------------------------------------------------- CLIP
def clip_views(split) -> tuple[Tensor, Tensor, list[list[str]]]:
    """(images I (N,3,S,S) in [0,1], the masked views (I ⊙ A where the image has a mask, else I), references)."""
    n = split.num_images
    images = torch.stack([split.image(i) for i in range(n)])
    has = split.has_masks
    masks = torch.stack([split.mask(i) for i in range(n)])
    masked = images * masks[:, None]
    return images, torch.where(has[:, None, None, None], masked, images), [list(r.references) for r in split.records]


@torch.no_grad()
def zero_shot_accuracy(clip: nn.Module, tokenizer, images01: Tensor, labels: Tensor, class_names: Sequence[str],
                       batch_size: int = 256) -> float:
    """Top-1 accuracy of `images01` against the prompts "a {class name}" (CLIP's zero-shot protocol)."""
    clip.eval()
    txt = F.normalize(clip.encode_text(tokenizer([_article(c) for c in class_names])), dim=-1)
    preds = []
    for s in range(0, images01.shape[0], batch_size):
        x = clip_preprocess(images01[s:s + batch_size], clip.visual.image_size[0]
                            if isinstance(clip.visual.image_size, (tuple, list)) else clip.visual.image_size)
        preds.append((F.normalize(clip.encode_image(x), dim=-1) @ txt.T).argmax(1))
    return float((torch.cat(preds) == labels).float().mean())


def pretrain_clip(clip: nn.Module, tokenizer, split, *, epochs: int = CLIP_EPOCHS, batch_size: int = CLIP_BATCH,
                  lr: float = CLIP_LR, seed: int = 0, log: Optional[list] = None) -> dict:
    """Contrastive pretraining of `clip` (an open_clip CLIP) in place on a training split; returns a report.

    Each epoch visits every image once, paired with one of its references (cycling), shown as I ⊙ A where it has
    a mask and with probability 1/2 (else whole). Loss: open_clip.loss.ClipLoss (symmetric InfoNCE).
    """
    from open_clip.loss import ClipLoss

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    images, masked, refs = clip_views(split)
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    n = images.shape[0]
    # every reference tokenised once: (total refs, 77)
    flat = [t for r in refs for t in r]
    offsets = torch.tensor([0] + [len(r) for r in refs]).cumsum(0)
    tokens = tokenizer(flat)
    loss_fn = ClipLoss()
    # The token table (49408 × width) stays at its random init: the rationales use ~100 of its rows, and dense
    # AdamW updates of the whole table would cost more than the rest of the model.
    params = [p for n, p in clip.named_parameters() if n != "token_embedding.weight"]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    steps_per_epoch = math.ceil(n / batch_size)
    total, step, losses = epochs * steps_per_epoch, 0, []
    clip.token_embedding.requires_grad_(False)
    clip.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=g)
        use_mask = torch.rand(n, generator=g) < 0.5
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            x = torch.where(use_mask[idx, None, None, None], masked[idx], images[idx])
            counts = offsets[idx + 1] - offsets[idx]
            ref = offsets[idx] + (epoch + idx) % counts
            _cosine_lr(opt, step, total, lr, warmup=steps_per_epoch)
            img_f, txt_f, scale = clip(clip_preprocess(x, size), tokens[ref])[:3]
            loss = loss_fn(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():  # open_clip's recipe: the temperature stays at most 100
                clip.logit_scale.clamp_(0, math.log(100))
            losses.append(float(loss.detach()))
            step += 1
        if log is not None:
            log.append({"epoch": epoch + 1, "loss": sum(losses[-steps_per_epoch:]) / steps_per_epoch})
    clip.eval().requires_grad_(False)
    k = steps_per_epoch
    return {"epochs": epochs, "steps": step, "seconds": round(time.perf_counter() - t0, 2),
            "loss_first_epoch": sum(losses[:k]) / k, "loss_last_epoch": sum(losses[-k:]) / k}


def clip_report(clip: nn.Module, tokenizer, split, decoy_box: Optional[tuple[int, int, int, int]] = None) -> dict:
    """Zero-shot accuracy on a (validation) split: whole images, I ⊙ A (the human mask) and, for the synthetic
    data, I ⊙ (decoy-corner box): CLIP should see the class in what the human mask reveals and not in the decoy."""
    n = split.num_images
    images = torch.stack([split.image(i) for i in range(n)])
    labels = split.labels
    out = {"n": n, "chance": 1 / len(split.class_names),
           "zero_shot_image": zero_shot_accuracy(clip, tokenizer, images, labels, split.class_names)}
    has = split.has_masks
    if bool(has.any()):
        masks = torch.stack([split.mask(i) for i in range(n)])[has]
        out["zero_shot_masked_object"] = zero_shot_accuracy(clip, tokenizer, images[has] * masks[:, None],
                                                            labels[has], split.class_names)
    if decoy_box is not None:
        x0, y0, x1, y1 = decoy_box
        box = torch.zeros(images.shape[-2:])
        box[y0:y1, x0:x1] = 1
        out["zero_shot_masked_decoy"] = zero_shot_accuracy(clip, tokenizer, images * box, labels, split.class_names)
    return out


# ----------------------------------------------------------------------------- LLM
@torch.no_grad()
def clip_tokens(clip: nn.Module, split, feature_layer: int, grid: tuple[int, int] = (4, 4),
                batch_size: int = 256) -> Tensor:
    """(N, gh·gw, width): the frozen CLIP's patch tokens of each image (I ⊙ A where the image has a mask, else I),
    pooled to `grid` exactly as SDTG pools them, i.e. what the LLM's image slot holds before the projection."""
    from .clip import CLIPVisionEncoder

    enc = CLIPVisionEncoder(clip, feature_layer).eval()
    _, views, _ = clip_views(split)
    out = [F.adaptive_avg_pool2d(enc(views[s:s + batch_size]), grid).flatten(2).transpose(1, 2)
           for s in range(0, views.shape[0], batch_size)]
    return torch.cat(out)


def _pairs(split, class_names: Sequence[str]) -> list[tuple[int, str, str]]:
    """(image index, class name, rationale) for every reference of every image."""
    return [(i, class_names[r.label], t) for i, r in enumerate(split.records) for t in r.references]


def _slot(llm: nn.Module, idx: Sequence[int], visual: Optional[Tensor], projector: Optional[nn.Module],
          g: torch.Generator) -> Tensor:
    """The image slot: the projected CLIP tokens of the images, or Gaussian vectors with the scale of the token
    embeddings when there is no pretrained CLIP to read."""
    if visual is not None:
        return projector(visual[list(idx)])
    w = llm.get_input_embeddings().weight
    return torch.randn(len(idx), N_VISUAL, w.shape[1], generator=g) * float(w.detach().std())


def _nll(llm: nn.Module, prompts, pairs, slot: Tensor) -> tuple[Tensor, int]:
    """Summed NLL of the rationale tokens (and </s>) of `pairs`, and their count, given the image slot."""
    embed = llm.get_input_embeddings()
    _, names, texts = zip(*pairs)
    inputs, mask, labels = prompts.training_batch(embed, slot, list(names), list(texts))
    return causal_lm_nll(llm, inputs, mask, labels)


@torch.no_grad()
def perplexity(llm: nn.Module, tokenizer, split, class_names: Sequence[str], visual: Optional[Tensor] = None,
               projector: Optional[nn.Module] = None, batch_size: int = 64, seed: int = 0,
               question: str = RATIONALE_QUESTION) -> float:
    """exp(mean NLL per rationale token) of a split's rationales, the prompt `question` (naming the true class by
    default), the image slot holding the projected CLIP tokens `visual` (N, T, D) of the split's images (noise when
    None)."""
    was = llm.training
    llm.eval()
    prompts, g = PromptBuilder(tokenizer, question), torch.Generator().manual_seed(seed)
    pairs = _pairs(split, class_names)
    total, count = 0.0, 0
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        nll, k = _nll(llm, prompts, chunk, _slot(llm, [p[0] for p in chunk], visual, projector, g))
        total, count = total + float(nll), count + k
    llm.train(was)
    return math.exp(total / max(count, 1))


def pretrain_llm(llm: nn.Module, tokenizer, split, class_names: Sequence[str], *, visual: Optional[Tensor] = None,
                 projector: Optional[nn.Module] = None, epochs: int = LLM_EPOCHS, batch_size: int = LLM_BATCH,
                 lr: float = LLM_LR, seed: int = 0, images: Optional[Sequence[bool]] = None,
                 question: str = RATIONALE_QUESTION, log: Optional[list] = None) -> dict:
    """Pretrain the tiny Llama in place as a conditional LM on a training split's rationales; returns a report.

    With `visual` (the frozen CLIP's tokens of the split's images, `clip_tokens`) the image slot holds
    `projector(visual)` and the projector trains jointly (LLaVA's alignment stage: the LLM learns to read CLIP);
    without, the slot holds noise. `images` (a flag per image) keeps only those images' rationales; the epochs are
    then scaled so that the number of optimiser steps stays that of the whole split. `question`: SDTG's
    (config.rationale_prompt), so that the LLM pretrains on the prompt MEGL will ask.
    """
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    prompts = PromptBuilder(tokenizer, question)
    pairs = _pairs(split, class_names)
    if images is not None:
        kept = [p for p in pairs if images[p[0]]]
        if not kept:
            raise ValueError("pretrain_llm: `images` keeps no training image")
        epochs = max(1, round(epochs * math.ceil(len(pairs) / batch_size) / math.ceil(len(kept) / batch_size)))
        pairs = kept
    params = list(llm.parameters()) + (list(projector.parameters()) if projector is not None else [])
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(pairs) / batch_size)
    total, step, losses = epochs * steps_per_epoch, 0, []
    llm.train()
    for epoch in range(epochs):
        order = torch.randperm(len(pairs), generator=g).tolist()
        for s in range(0, len(pairs), batch_size):
            chunk = [pairs[i] for i in order[s:s + batch_size]]
            _cosine_lr(opt, step, total, lr, warmup=steps_per_epoch)
            nll, k = _nll(llm, prompts, chunk, _slot(llm, [p[0] for p in chunk], visual, projector, g))
            loss = nll / k
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
        if log is not None:
            log.append({"epoch": epoch + 1, "loss": sum(losses[-steps_per_epoch:]) / steps_per_epoch})
    llm.eval()
    for p in params:
        p.requires_grad_(False)
    k = steps_per_epoch
    return {"epochs": epochs, "steps": step, "seconds": round(time.perf_counter() - t0, 2),
            "image_slot": "clip" if visual is not None else "noise", "images": len({p[0] for p in pairs}),
            "loss_first_epoch": sum(losses[:k]) / k, "loss_last_epoch": sum(losses[-k:]) / k}


__all__ = ["clip_report", "clip_tokens", "perplexity", "pretrain_clip", "pretrain_llm", "zero_shot_accuracy"]

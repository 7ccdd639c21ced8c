"""CLIPScore (Hessel et al., 2021): reference-free image-text alignment, 2.5 · max(cos(E_image, E_text), 0).

Images come in as the batch holds them, (B, 3, H, W) in [0, 1], and are resized to the CLIP model's input size
and normalised with its mean / std here. The score of a set is the mean of the per-pair scores.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CLIPSCORE_W = 2.5


def clip_image_size(clip_model) -> tuple[int, int]:
    size = getattr(getattr(clip_model, "visual", None), "image_size", None)
    if size is None:
        raise ValueError("cannot tell the CLIP model's input size: expected an open_clip model with .visual.image_size")
    return (size, size) if isinstance(size, int) else tuple(size)


def clip_normalization(clip_model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(getattr(clip_model, "visual", None), "preprocess_cfg", None) or {}
    return tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD))


def preprocess_for_clip(images01: Tensor, clip_model) -> Tensor:
    """[0, 1] images -> the CLIP model's input: bicubic resize to its size, normalise with its mean / std."""
    if images01.dim() != 4 or images01.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got {tuple(images01.shape)}")
    x = images01.float()
    size = clip_image_size(clip_model)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean, std = clip_normalization(clip_model)
    mean = torch.tensor(mean, device=x.device)[:, None, None]
    std = torch.tensor(std, device=x.device)[:, None, None]
    return (x - mean) / std


@torch.no_grad()
def clip_scores(clip_model, tokenizer: Callable, images01: Tensor, texts: Sequence[str],
                w: float = CLIPSCORE_W, preprocessed: bool = False) -> Tensor:
    """Per-pair CLIPScore, (B,): w · max(cos(encode_image(image_i), encode_text(text_i)), 0).

    clip_model: anything with open_clip's encode_image / encode_text; tokenizer: texts -> token ids.
    preprocessed: images are already the model's normalised input (skip `preprocess_for_clip`).
    """
    if len(texts) != images01.shape[0]:
        raise ValueError(f"{images01.shape[0]} images but {len(texts)} texts")
    device = next(clip_model.parameters()).device
    x = images01.to(device) if preprocessed else preprocess_for_clip(images01.to(device), clip_model)
    dtype = next(clip_model.parameters()).dtype
    img = clip_model.encode_image(x.to(dtype)).float()
    txt = clip_model.encode_text(tokenizer(list(texts)).to(device)).float()
    cos = F.cosine_similarity(img, txt, dim=-1)
    return w * cos.clamp_min(0)


def clip_score(clip_model, tokenizer: Callable, images01: Tensor, texts: Sequence[str], w: float = CLIPSCORE_W) -> float:
    """Mean CLIPScore over the pairs."""
    return float(clip_scores(clip_model, tokenizer, images01, texts, w).mean())


def load_open_clip(model_name: str, pretrained: str | None = None, device: str | torch.device = "cpu"):
    """(model, tokenizer) of an open_clip model for CLIPScore, from local weights only (no download).

    pretrained: a local checkpoint file (e.g. open_clip_pytorch_model.bin / .safetensors). None gives random
    weights, which makes CLIPScore meaningless; the evaluator only does that when asked to.
    """
    import os

    import open_clip
    if pretrained is not None and not os.path.isfile(pretrained):
        raise FileNotFoundError(
            f"CLIPScore weights {pretrained!r} not found; pass a local open_clip checkpoint file "
            "(weights are never downloaded at run time)")
    model = open_clip.create_model(model_name, pretrained=pretrained, device=device)
    model.eval().requires_grad_(False)
    return model, open_clip.get_tokenizer(model_name)

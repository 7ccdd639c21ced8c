"""The frozen CLIP vision encoder E of SDTG: Z_A = CLIP(I ⊙ Â), gradients flow to the input image.

`clip_model="ViT-L-14"` (any open_clip name) builds it with `open_clip.create_model(name, pretrained=<local file>)`;
the embedded "tiny" is an `open_clip.model.CLIP` with a small ViT vision tower and a small text tower (the text
tower keeps the standard 49408-token vocabulary, so open_clip's bundled BPE tokenizer works for CLIPScore; its
context is `tiny_clip_context` tokens), pretrained contrastively on the run's training split (megl.models.pretrain, cached by
megl.models.standins) and then frozen; "tiny-random" is the same architecture random-initialised.
"""
from __future__ import annotations

import open_clip
from typing import Optional

from torch import Tensor, nn

from megl.config import EMBEDDED, TINY
from megl.data.transforms import clip_preprocess
from megl.errors import WeightsError


def tiny_clip(config) -> nn.Module:
    """The embedded architecture, random-initialised (from the current torch RNG)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    w = config.tiny_clip_width
    vision = CLIPVisionCfg(layers=config.tiny_clip_layers, width=w, head_width=w // 2, mlp_ratio=2.0,
                           patch_size=config.tiny_clip_patch, image_size=config.clip_image_size)
    text = CLIPTextCfg(context_length=config.tiny_clip_context, vocab_size=49408, width=w, heads=2,
                       layers=config.tiny_clip_layers, mlp_ratio=2.0)
    return CLIP(embed_dim=w, vision_cfg=vision, text_cfg=text)


def build_open_clip(config, state: Optional[dict] = None) -> nn.Module:
    """The frozen CLIP. `state`: the pretrained tiny stand-in's weights (required for clip_model="tiny")."""
    if config.clip_model in EMBEDDED:
        model = tiny_clip(config)
        if config.clip_model == TINY:
            if state is None:
                raise ValueError("clip_model='tiny' is the pretrained stand-in: pass its weights "
                                 "(megl.models.standins.for_run / load_from_run), or use clip_model=tiny-random")
            model.load_state_dict(state)
    else:
        if config.clip_weights is None:
            raise FileNotFoundError(
                f"clip_model={config.clip_model!r} needs local weights: set clip_weights to the open_clip checkpoint "
                "file (weights are never downloaded at run time), or use clip_model=tiny"
            )
        try:
            model = open_clip.create_model(config.clip_model, pretrained=config.clip_weights)
        except Exception as e:  # unknown name, unreadable file, weights of another architecture: open_clip's types vary
            detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise WeightsError(f"clip_model={config.clip_model!r} with clip_weights={config.clip_weights!r} does not "
                               f"load ({type(e).__name__}: {detail}): give that open_clip architecture's checkpoint "
                               "file") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def clip_tokenizer(config):
    """open_clip's tokenizer for the model (the bundled BPE for OpenAI-style towers; works offline)."""
    if config.clip_model in EMBEDDED:
        return open_clip.get_tokenizer("ViT-L-14", context_length=config.tiny_clip_context)
    return open_clip.get_tokenizer(config.clip_model)


class CLIPVisionEncoder(nn.Module):
    """Patch tokens of one block of CLIP's vision tower as a grid: (B, width, gh, gw)."""

    def __init__(self, clip: nn.Module, feature_layer: int = -2):
        super().__init__()
        self.clip = clip
        visual = clip.visual
        size = visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.width = visual.conv1.out_channels
        n_blocks = len(visual.transformer.resblocks)
        self.layer = feature_layer % n_blocks

    def train(self, mode: bool = True):  # the encoder stays in eval mode (frozen, no dropout)
        return super().train(False)

    def forward(self, image01: Tensor) -> Tensor:
        x = clip_preprocess(image01, self.image_size)
        dtype = next(self.clip.parameters()).dtype
        out = self.clip.visual.forward_intermediates(x.to(dtype), indices=[self.layer], stop_early=True,
                                                     intermediates_only=True, output_fmt="NCHW")
        return out["image_intermediates"][0]


__all__ = ["CLIPVisionEncoder", "build_open_clip", "clip_tokenizer", "tiny_clip"]

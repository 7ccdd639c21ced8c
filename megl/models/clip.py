"""The frozen CLIP vision encoder E of SDTG: Z_A = CLIP(I ⊙ Â), gradients flow to the input image.

`clip_model="ViT-L-14"` (any open_clip name) builds it with `open_clip.create_model(name, pretrained=<local file>)`;
the embedded default "tiny" is an `open_clip.model.CLIP` with a small ViT vision tower and a small text tower
(the text tower keeps the standard 49408-token vocabulary and context 77, so open_clip's bundled BPE tokenizer
works for CLIPScore), random-initialised and frozen.
"""
from __future__ import annotations

import open_clip
from torch import Tensor, nn

from megl.data.transforms import clip_preprocess
from megl.errors import WeightsError


def build_open_clip(config) -> nn.Module:
    if config.clip_model == "tiny":
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        w = config.tiny_clip_width
        vision = CLIPVisionCfg(layers=config.tiny_clip_layers, width=w, head_width=w // 2, mlp_ratio=2.0,
                               patch_size=config.tiny_clip_patch, image_size=config.clip_image_size)
        text = CLIPTextCfg(context_length=77, vocab_size=49408, width=w, heads=2, layers=config.tiny_clip_layers,
                           mlp_ratio=2.0)
        model = CLIP(embed_dim=w, vision_cfg=vision, text_cfg=text)
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
    return open_clip.get_tokenizer("ViT-L-14" if config.clip_model == "tiny" else config.clip_model)


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


__all__ = ["CLIPVisionEncoder", "build_open_clip", "clip_tokenizer"]

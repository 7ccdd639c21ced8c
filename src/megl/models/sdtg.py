"""Saliency-Driven Textual Grounding (paper §3.3).

V_I = W_I · Z_I (classifier tokens), V_A = W_A · Z_A (CLIP tokens of I ⊙ Â), V = V_I + V_A.
The two token grids have different sizes (e.g. ResNet18 layer4 4×4 or 7×7, CLIP ViT-L-14 16×16), so CLIP's patch
grid is adaptive-average-pooled to the classifier's grid before the sum: V has one token per Grad-CAM cell, and
token (i, j) of V_I and of V_A cover the same image region.

V is inserted as visual tokens in the conversation template of models/conversation.py, whose question names the
class (or, with config.rationale_prompt = "image", does not); the answer is the rationale.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megl.config import SDTG_GRIDS


class SDTG(nn.Module):
    """image_tokens=False leaves V_I out (V = V_A): the LLM then sees the image only through I ⊙ Â, so L_text reaches
    the classifier only through Â (config.sdtg_image_tokens; W_I stays, frozen, so checkpoints keep one layout).

    grid="classifier": V has one token per Grad-CAM cell (CLIP's grid pooled to the classifier's). "coarser": both
    grids are pooled to the coarser of the two, per side (config.sdtg_grid). It matters when the classifier's grid
    is the finer one, as at DecoyMNIST's conv1 tap (24×24 against CLIP's 4×4): "classifier" then repeats each CLIP
    token 36 times in a 576-token slot, while the LLM stand-in was pretrained on CLIP's 16 (docs/decoy_mnist.md)."""

    def __init__(self, feature_dim: int, clip_dim: int, llm_dim: int, image_tokens: bool = True,
                 grid: str = "classifier"):
        super().__init__()
        if grid not in SDTG_GRIDS:
            raise ValueError(f"SDTG: grid must be one of {', '.join(SDTG_GRIDS)}, got {grid!r}")
        self.W_I = nn.Linear(feature_dim, llm_dim)
        self.W_A = nn.Linear(clip_dim, llm_dim)
        self.image_tokens = image_tokens
        self.grid = grid
        self.W_I.requires_grad_(image_tokens)

    def forward(self, Z_I: Tensor, grid: tuple[int, int], Z_A: Tensor) -> Tensor:
        """Z_I (B, h*w, D_f) on the classifier's (h, w) `grid`, Z_A (B, D_c, gh, gw) -> V (B, T, D_llm), T = h*w
        (grid "classifier") or min(h, gh)*min(w, gw) ("coarser")."""
        if Z_I.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"SDTG: {Z_I.shape[1]} classifier tokens for a {grid} grid")
        if self.grid == "coarser" and (grid[0] > Z_A.shape[-2] or grid[1] > Z_A.shape[-1]):
            B, _, D = Z_I.shape
            Z_I = Z_I.transpose(1, 2).reshape(B, D, *grid)
            grid = (min(grid[0], Z_A.shape[-2]), min(grid[1], Z_A.shape[-1]))
            Z_I = F.adaptive_avg_pool2d(Z_I, grid).flatten(2).transpose(1, 2)
        Z_A = F.adaptive_avg_pool2d(Z_A.to(self.W_A.weight.dtype), grid).flatten(2).transpose(1, 2)
        V_A = self.W_A(Z_A)
        return V_A + self.W_I(Z_I.to(self.W_I.weight.dtype)) if self.image_tokens else V_A


def _cache_argument(llm: nn.Module) -> str:
    """The KV-cache keyword (and output field) of the LLM's forward: `cache` in current transformers, where
    `past_key_values` is deprecated (removed in 5.40); `past_key_values` in versions before the rename."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm  # under peft's wrapper
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@torch.no_grad()
def greedy_generate(llm: nn.Module, embed: nn.Module, inputs: Tensor, mask: Tensor, positions: Tensor,
                    max_new_tokens: int, eos: int) -> list[list[int]]:
    """Greedy decoding with a KV cache from prompt embeddings; returns the new token ids (without </s>)."""
    B = inputs.shape[0]
    out_ids: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=inputs.device)
    cache = _cache_argument(llm)
    out = llm(inputs_embeds=inputs, attention_mask=mask, position_ids=positions, use_cache=True)
    for _ in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        for b in range(B):
            if not done[b] and int(nxt[b]) != eos:
                out_ids[b].append(int(nxt[b]))
        done |= nxt == eos
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = llm(inputs_embeds=embed(nxt)[:, None], attention_mask=mask, position_ids=positions,
                  use_cache=True, **{cache: getattr(out, cache)})
    return out_ids

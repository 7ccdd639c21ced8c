"""What a run's checkpoint stores of a model, and how it is put back: one rule for MEGLModel and the LLM classifiers.

Stored: every trainable tensor, every buffer, and the frozen weights that cannot be reloaded from a file. Not
stored: a CLIP or LLM that comes from a file (a local checkpoint, or the pretrained stand-ins in <run>/standins/);
only the random `tiny-random` towers must travel with the run.
"""
from __future__ import annotations

from torch import Tensor, nn

from megl.config import TINY_RANDOM


def checkpoint_state(module: nn.Module, config, clip_prefix: str = "clip_encoder.", llm_prefix: str = "llm.") -> dict:
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    skip_clip = config.clip_model != TINY_RANDOM
    file_llm = config.llm != TINY_RANDOM
    return {n: t for n, t in module.state_dict().items()
            if not (skip_clip and n.startswith(clip_prefix))
            and not (file_llm and n.startswith(llm_prefix) and n not in trainable)}


def load_checkpoint_state(module: nn.Module, state: dict[str, Tensor], what: str = "model") -> None:
    """Load `state` (from `checkpoint_state`), refusing one whose keys are not exactly what this model stores."""
    expected = set(module.checkpoint_state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the {what} built from config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} ({len(missing)} / {len(unexpected)} in all)")
    module.load_state_dict(state, strict=False)

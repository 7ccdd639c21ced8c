"""The LLM of SDTG: Vicuna v1.5 (a local directory) or a tiny Llama, with LoRA adapters (peft).

The tiny Llama ("tiny") is pretrained as a language model on the run's training rationales
(megl.models.pretrain, cached by megl.models.standins); "tiny-random" is the same architecture random-initialised.

Attention: flash_attention_2 when flash-attn imports and the device is CUDA, else PyTorch SDPA. bf16 on GPU.
The base weights are frozen; only the LoRA adapters train.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megl.config import EMBEDDED, TINY
from megl.errors import WeightsError

from .conversation import IGNORE_INDEX


def causal_lm_nll(llm: nn.Module, inputs: Tensor, mask: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Summed next-token NLL (float32) of the labelled tokens, and their count: what `llm(..., labels=labels).loss`
    averages, but the LM head runs on the labelled positions only. In an SDTG batch most positions are prompt and
    image tokens (labels IGNORE_INDEX), and with Vicuna's 32k vocabulary their logits would be the largest tensor of
    the step (B·L·32000 floats, kept for the backward)."""
    hidden = llm.get_decoder()(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    logits = llm.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, target[keep], reduction="sum"), int(keep.sum())


def causal_lm_loss(llm: nn.Module, inputs: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
    """Mean NLL of the labelled tokens (Hugging Face's causal-LM loss), via causal_lm_nll."""
    nll, n = causal_lm_nll(llm, inputs, mask, labels)
    return nll / max(n, 1)


def attention_implementation(device: torch.device) -> str:
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except Exception:  # a broken flash-attn build: fall back rather than fail the run
            pass
    return "sdpa"


def tiny_llama(config, tokenizer, attn: str = "sdpa") -> nn.Module:
    """The embedded architecture (transformers' LlamaForCausalLM), random-initialised, float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    h = config.tiny_llm_hidden
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=h, intermediate_size=2 * h, num_hidden_layers=config.tiny_llm_layers,
        num_attention_heads=config.tiny_llm_heads, num_key_value_heads=config.tiny_llm_heads,
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg)


def build_llm(config, tokenizer, device: torch.device, state: Optional[dict] = None) -> nn.Module:
    """Frozen base LLM + LoRA. `state`: the pretrained tiny stand-in's weights (required for llm="tiny")."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    attn = attention_implementation(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if config.llm in EMBEDDED:
        model = tiny_llama(config, tokenizer, attn)
        if config.llm == TINY:
            if state is None:
                raise ValueError("llm='tiny' is the pretrained stand-in: pass its weights "
                                 "(megl.models.standins.for_run / load_from_run), or use llm=tiny-random")
            model.load_state_dict(state)
        model = model.to(dtype)
    else:
        if not os.path.isdir(config.llm):
            raise FileNotFoundError(f"llm directory {config.llm!r} not found: give a local Vicuna v1.5 checkpoint "
                                    "directory (--set llm=PATH) or use llm=tiny (or tiny-random)")
        try:
            model = AutoModelForCausalLM.from_pretrained(config.llm, dtype=dtype, attn_implementation=attn)
        except (OSError, ValueError, RuntimeError, KeyError) as e:  # no config / weights, another architecture
            detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise WeightsError(f"llm={config.llm!r} does not load as a causal LM ({type(e).__name__}: {detail}): give "
                               "a directory with config.json, the weights and the tokenizer (save_pretrained)") from None
    for p in model.parameters():
        p.requires_grad_(False)
    if config.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_target_modules), bias="none", task_type="CAUSAL_LM")
    import warnings

    with warnings.catch_warnings():  # peft calls transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


def build_vision_and_llm(config, tokenizer, device: torch.device, standins: dict) -> tuple[nn.Module, nn.Module]:
    """(frozen CLIP vision encoder, LLM + LoRA): what MEGLModel and the LLM classifiers share. Call it inside the
    builder's seeded block: their random initialisation draws from the global RNG."""
    from .clip import CLIPVisionEncoder, build_open_clip

    clip = build_open_clip(config, standins.get("clip"))
    return CLIPVisionEncoder(clip, config.clip_feature_layer), build_llm(config, tokenizer, device, standins.get("llm"))


def attach_llm_parts(module, config, class_names, clip_encoder, llm, tokenizer, clip_tok) -> None:
    """The parts MEGLModel and the LLM classifiers both hold, under the same names (their checkpoints rely on it)."""
    module.config = config
    module.class_names = list(class_names)
    module.clip_encoder = clip_encoder
    module.llm = llm
    module.tokenizer = tokenizer
    module.clip_tokenizer = clip_tok

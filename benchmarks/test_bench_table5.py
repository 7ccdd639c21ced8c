"""Table 5 of the paper (efficiency analysis): parameters, latency, FPS of the deployed classifiers against
LLaVA-1.5-7B, batch size 1, no post-processing, no decoding.

- MEGL-ResNet18, MEGL-ViT-B/16: as deployed, MEGL is the classifier alone (torchvision models, random
  weights, 224 px, 40 classes as Object-ME: 11.2 M and 85.8 M parameters, the paper's 11 M and 85 M).
- LLaVA-1.5-7B: transformers `LlavaForConditionalGeneration` from a `LlavaConfig` with the CLIP ViT-L/14-336
  vision tower (feature layer -2, CLS dropped: 576 image tokens) and the Llama-7B / Vicuna-7B text config
  (vocabulary 32064), random weights: 7,063 M parameters, the paper's 7063M. Built on the `meta` device for
  counting, materialised only when timed. One prefill of a Vicuna-v1 prompt (system prompt, question and
  the 576 image tokens; token ids are random, no tokenizer is needed for timing) with the KV cache on and only the
  last position's logits computed (`logits_to_keep=1`), as `generate` does before the first new token.

bf16 on CUDA (the paper's setting, on an L40S), fp32 on CPU. The 7B model needs ~14 GB in bf16 (28 GB fp32)
and minutes per forward on CPU: it runs on CUDA by default and on CPU only with MEGL_BENCH_LLAVA=1
(MEGL_BENCH_LLAVA=0 turns it off everywhere; MEGL_BENCH_LLAVA_DTYPE=bfloat16 lets it fit a 16-24 GB host).
On CUDA a `torch.compile(mode="reduce-overhead")` (Inductor + CUDA graphs) variant of the classifiers is timed
too, against the ≤1.5 ms (ResNet18) / ≤2.5 ms (ViT-B/16) goals.
"""
from __future__ import annotations

import os

import pytest
import torch

import benchutil
from benchutil import DISPLAY, NUM_CLASSES, build_classifier, image_size

IMAGE_TOKENS = 576
# Vicuna-v1 prompt of LLaVA-1.5: system prompt (~32 tokens) + "USER: <image>\n" + question (~20) + " ASSISTANT:"
TEXT_TOKENS_BEFORE_IMAGE = 36
TEXT_TOKENS_AFTER_IMAGE = 24


def llava_config(tiny: bool = False):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if tiny:  # quick mode: the same classes and code path, toy sizes
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=56, patch_size=14, projection_dim=32, hidden_act="quick_gelu")
        text = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=1001)
        return LlavaConfig(vision_config=vision, text_config=text, image_token_index=1000, image_seq_length=16,
                           vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    # llava-hf/llava-1.5-7b-hf
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, pad_token_id=32001)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=IMAGE_TOKENS,
                       vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")


def llava_param_count(config) -> int:
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return benchutil.count_params(model)


def _dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def _llava_skip_reason(device, dtype, nparams) -> str | None:
    flag = benchutil.env_flag("MEGL_BENCH_LLAVA", default=(device == "cuda"))
    if not flag:
        return ("LLaVA-1.5-7B on CPU needs ~28 GB (fp32) and minutes per forward: opt in with MEGL_BENCH_LLAVA=1"
                if device == "cpu" else "turned off by MEGL_BENCH_LLAVA=0")
    need = nparams * torch.empty((), dtype=dtype).element_size() * 1.15
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        have = free
    else:
        have = benchutil.mem_available_bytes()
    if have is not None and have < need:
        return (f"LLaVA-1.5-7B in {str(dtype)[6:]} needs ~{need / 2**30:.0f} GiB, {device} has {have / 2**30:.0f} GiB free"
                + (" (MEGL_BENCH_LLAVA_DTYPE=bfloat16 halves it)" if device == "cpu" and dtype == torch.float32 else ""))
    return None


def _variants():
    out = [pytest.param(benchutil.main_device(), "eager", id=f"{benchutil.main_device()}-eager")]
    if benchutil.main_device() == "cuda":
        out.append(pytest.param("cuda", "compiled", id="cuda-compiled"))
    return out


@pytest.mark.parametrize("model_name", ["resnet18", "vit_b_16"])
@pytest.mark.parametrize("device,variant", _variants())
def test_table5_classifier(benchmark, device, variant, model_name):
    dtype = _dtype(device)
    size = image_size()
    model = build_classifier(model_name, size).to(device=device, dtype=dtype).eval()
    nparams = benchutil.count_params(model)
    x = torch.rand(1, 3, size, size, device=device, dtype=dtype)
    fn_model = model
    if variant == "compiled":
        torch._dynamo.reset()
        fn_model = torch.compile(model, mode="reduce-overhead", fullgraph=True)

    def fn():
        with torch.inference_mode():
            return fn_model(x)

    label = DISPLAY[model_name] + ("" if variant == "eager" else " (torch.compile + CUDA graphs)")
    benchmark.group = f"table5 {device} {str(dtype)[6:]} batch=1"
    benchmark.extra_info.update(benchutil.base_info(
        device, dtype, suite="table5", model=model_name, label=label, variant=variant, params=nparams,
        batch=1, image_size=size, num_classes=NUM_CLASSES,
    ))
    benchutil.measure(benchmark, fn, device, warmup=5 if variant == "compiled" else 2, max_rounds=500)


def test_table5_llava(benchmark):
    from transformers import LlavaForConditionalGeneration

    device = benchutil.main_device()
    dtype = _dtype(device)
    if device == "cpu" and benchutil.env_flag("MEGL_BENCH_LLAVA") and not benchutil.quick():
        dtype = getattr(torch, os.environ.get("MEGL_BENCH_LLAVA_DTYPE", "float32"))
    full_config = llava_config()
    full_params = llava_param_count(full_config)
    tiny = benchutil.quick()
    if not tiny:
        reason = _llava_skip_reason(device, dtype, full_params)
        if reason:
            pytest.skip(reason)
    config = llava_config(tiny=tiny)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    nparams = benchutil.count_params(model)
    vc = config.vision_config
    n_img = (vc.image_size // vc.patch_size) ** 2  # CLS dropped by the "default" feature strategy
    vocab = config.text_config.vocab_size
    g = torch.Generator().manual_seed(0)
    before = torch.randint(3, min(vocab, 32000) - 1, (TEXT_TOKENS_BEFORE_IMAGE,), generator=g)
    after = torch.randint(3, min(vocab, 32000) - 1, (TEXT_TOKENS_AFTER_IMAGE,), generator=g)
    before = before.clamp_max(config.image_token_index - 1)
    after = after.clamp_max(config.image_token_index - 1)
    before[0] = 1  # <s>
    ids = torch.cat([before, torch.full((n_img,), config.image_token_index), after])[None].to(device)
    attn = torch.ones_like(ids)
    pixels = torch.rand(1, 3, vc.image_size, vc.image_size, generator=g).to(device=device, dtype=dtype)

    def fn():
        with torch.inference_mode():
            return model(input_ids=ids, pixel_values=pixels, attention_mask=attn, use_cache=True, logits_to_keep=1).logits

    benchmark.group = f"table5 {device} {str(dtype)[6:]} batch=1"
    benchmark.extra_info.update(benchutil.base_info(
        device, dtype, suite="table5", model="llava-1.5-7b", label=DISPLAY["llava-1.5-7b"] + (" [tiny config]" if tiny else ""),
        variant="eager", params=nparams, params_full_config=full_params, batch=1, image_size=vc.image_size,
        image_tokens=n_img, seq_len=int(ids.shape[1]), logits_to_keep=1, attn_implementation="sdpa",
        is_reference_row=not tiny,
    ))
    slow = device == "cpu" and not tiny
    benchutil.measure(benchmark, fn, device, warmup=1 if slow else 2, rounds=2 if slow else None)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()

"""The run configuration: one flat dataclass, presets, JSON config files and command-line overrides.

Resolution order (later wins): dataclass defaults < `--preset` < `--config FILE` < explicit flags / `--set key=value`.
The resolved config is what a run directory's `config.json` holds; `megl.runs.load_run` rebuilds everything from it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

BACKBONES = ("resnet18", "vit_b_16")
TINY = "tiny"  # the embedded CLIP / LLM: small models pretrained on the run's training split (megl.models.standins)
TINY_RANDOM = "tiny-random"  # the same architectures random-initialised (fast; for tests and smoke runs)
EMBEDDED = (TINY, TINY_RANDOM)


@dataclass
class Config:
    # --- run
    seed: int = 0  # initialisation, data order, dropout
    data_seed: int = 0  # the synthetic data and a seeded split: fixed across seeds, so seeds vary training only
    device: str = "cpu"
    method: str = "megl"  # a name in megl.losses.METHODS
    deterministic: bool = True

    # --- data: synthetic (data_root None) or an Object-ME/Action-ME directory
    data_root: Optional[str] = None
    image_size: int = 64
    synthetic: dict = field(default_factory=dict)  # overrides of megl.data.synthetic.SyntheticConfig

    # --- classifier
    backbone: str = "resnet18"
    classifier_weights: Optional[str] = None  # torchvision state dict (.pth / .safetensors), e.g. ImageNet weights
    # Grad-CAM map of ResNet18 = image / 32 by default (2x2 at 64 px: too coarse to guide). Default here: layer4
    # stride 1 -> image / 16 (4x4 at 64 px) at 1.7x the compute of the stock net (no stem max-pool: 3.8x).
    # Paper presets: the stock net (7x7 at 224 px).
    resnet_stem_maxpool: bool = True
    resnet_layer4_stride: int = 1
    vit_patch_size: int = 16  # ViT-B/16 shape; the tests use a tiny ViT through the same code
    vit_layers: int = 12
    vit_heads: int = 12
    vit_hidden: int = 768
    vit_mlp: int = 3072

    # --- CLIP vision encoder (frozen)
    clip_model: str = TINY  # "tiny" (pretrained stand-in), "tiny-random" or an open_clip model name ("ViT-L-14")
    clip_weights: Optional[str] = None  # local checkpoint for open_clip.create_model(pretrained=...)
    clip_image_size: int = 32  # tiny CLIP only (named models use their own size); 4×4 patches = the Grad-CAM grid
    clip_feature_layer: int = -2  # which block's patch tokens (LLaVA: the penultimate)
    tiny_clip_width: int = 64
    tiny_clip_layers: int = 2
    tiny_clip_patch: int = 8
    tiny_clip_context: int = 32  # text tower positions; rationales and class prompts are far shorter

    # --- LLM (Vicuna v1.5 or a tiny Llama) + LoRA
    llm: str = TINY  # "tiny" (pretrained stand-in), "tiny-random" or a local directory for from_pretrained
    tokenizer_vocab_size: int = 600  # tiny LLM: BPE vocabulary trained on the rationales and prompts
    tiny_llm_hidden: int = 64
    tiny_llm_layers: int = 2
    tiny_llm_heads: int = 4
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    gradient_checkpointing: bool = False
    max_new_tokens: int = 32

    # --- loss (DESIGN §1) and ablation switches (paper Table 4)
    lambda_text: float = 1.0
    lambda_visual: float = 1.0
    use_visual: bool = True  # L1(Â, A) on annotated samples
    use_text: bool = True  # SDTG autoregressive loss
    use_consistency: bool = True  # KL(Â ‖ Ā) on unannotated samples
    saliency_backend: str = "auto"
    method_args: dict = field(default_factory=dict)  # hyper-parameters of the comparison methods

    # --- optimisation
    epochs: int = 2  # the default run (synthetic, ResNet18 64 px, tiny CLIP/LLM) fits in ~5 min on 2 CPU cores
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 1e-3  # classifier
    lr_projector: float = 1e-3  # W_I, W_A
    lr_lora: float = 1e-3
    weight_decay: float = 0.0
    checkpoint_every: int = 20  # optimiser steps between checkpoints (and at every epoch end)
    num_workers: int = 0
    num_overlays: int = 4
    max_steps_per_epoch: Optional[int] = None  # cap for smoke tests

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys are the fields of megl.config.Config")
        return cls(**d)

    def validate(self) -> "Config":
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone {self.backbone!r} is not supported; choose one of {', '.join(BACKBONES)}")
        from megl.losses import METHODS

        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(sorted(METHODS))}")
        if self.backbone == "vit_b_16" and self.image_size % self.vit_patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of vit_patch_size {self.vit_patch_size}")
        # checked here, not as a ZeroDivisionError or an empty range after the first training step
        counts = {k: 1 for k in ("image_size", "epochs", "batch_size", "eval_batch_size", "checkpoint_every",
                                 "max_new_tokens", "lora_r", "tokenizer_vocab_size", "max_steps_per_epoch")}
        counts.update(num_workers=0, num_overlays=0)
        for key, least in counts.items():
            value = getattr(self, key)
            if value is None and key == "max_steps_per_epoch":  # None: no cap
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                what = "a positive integer" if least else "an integer >= 0"
                raise ValueError(f"{key} = {value!r} must be {what} (--set {key}=N with N >= {least})")
        for key in ("classifier_weights", "clip_weights", "data_root"):
            path = getattr(self, key)
            if path is not None and not os.path.exists(path):
                raise FileNotFoundError(f"{key} = {path!r} does not exist; fix the path (--set {key}=PATH) or drop it")
        if self.llm not in EMBEDDED and not os.path.isdir(self.llm):
            raise FileNotFoundError(
                f"llm = {self.llm!r} is not a directory: give a local Vicuna v1.5 (or Llama) checkpoint "
                f"directory with --set llm=PATH, or use llm=tiny (or tiny-random)"
            )
        return self


# Paper settings (§4.4): CLIP ViT-L-14, Vicuna v1.5 7B with LoRA, frozen vision tower, 224 px.
# The paper gives no learning rates or epochs; these are LLaVA-1.5's LoRA defaults (r 128, alpha 256,
# lr 2e-4, projector lr 2e-5) and a classifier fine-tuning lr of 1e-4 for ImageNet-initialised backbones.
_PAPER = dict(
    image_size=224, clip_model="ViT-L-14", lora_r=128, lora_alpha=256, lora_dropout=0.05,
    lr=1e-4, lr_projector=2e-5, lr_lora=2e-4, epochs=10, batch_size=16, eval_batch_size=64,
    gradient_checkpointing=True, checkpoint_every=200, max_new_tokens=64,
)
PRESETS: dict[str, dict] = {
    "paper-resnet18": dict(_PAPER, backbone="resnet18", resnet_stem_maxpool=True, resnet_layer4_stride=2),
    "paper-vit-b16": dict(_PAPER, backbone="vit_b_16", vit_patch_size=16, vit_layers=12, vit_heads=12,
                          vit_hidden=768, vit_mlp=3072),
}
# Local weights each preset needs: config key -> what to put there.
PRESET_PATHS = {
    "clip_weights": "the open_clip ViT-L-14 checkpoint (e.g. open_clip_pytorch_model.bin of laion/openai ViT-L-14)",
    "llm": "the Vicuna v1.5 7B directory (config.json + weights + tokenizer)",
}


def check_preset_paths(config: Config, preset: str) -> None:
    missing = []
    for key, what in PRESET_PATHS.items():
        value = getattr(config, key)
        if value is None or value in EMBEDDED or not os.path.exists(str(value)):
            missing.append(f"  {key}: {what}; got {value!r} -> pass --set {key}=/path")
    if missing:
        raise FileNotFoundError(f"preset {preset!r} needs local weights that are missing:\n" + "\n".join(missing))


def parse_value(text: str) -> Any:
    """`--set` values: JSON when it parses (numbers, true/false/null, lists, dicts), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(d: dict, pairs: list[str]) -> dict:
    """Apply `key=value` pairs; `synthetic.num_train=20` sets a key inside a dict field."""
    d = json.loads(json.dumps(d))
    valid = {f.name for f in dataclasses.fields(Config)}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        head, _, sub = key.partition(".")
        if head not in valid:
            raise ValueError(f"--set {key}: unknown config key {head!r}; valid keys: {', '.join(sorted(valid))}")
        if sub:
            if not isinstance(d.get(head), dict):
                raise ValueError(f"--set {key}: {head!r} is not a dict field")
            d[head][sub] = parse_value(value)
        else:
            d[head] = parse_value(value)
    return d


def resolve(preset: Optional[str] = None, config_file: Optional[str] = None, overrides: Optional[dict] = None,
            sets: Optional[list[str]] = None) -> Config:
    """Build the run config: defaults < preset < config file < explicit overrides < --set pairs."""
    d = Config().to_dict()
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        d.update(PRESETS[preset])
    if config_file is not None:
        with open(config_file) as f:
            loaded = json.load(f)
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_file}: a config file must hold a JSON object of Config fields")
        d.update(loaded)
    d.update({k: v for k, v in (overrides or {}).items() if v is not None})
    d = apply_overrides(d, sets or [])
    config = Config.from_dict(d)
    if preset is not None:
        check_preset_paths(config, preset)
    return config.validate()

"""The run configuration: one flat dataclass, presets, JSON config files and command-line overrides.

Resolution order (later wins): dataclass defaults < `--preset` < `--config FILE` < explicit flags / `--set key=value`.
The resolved config is what a run directory's `config.json` holds; `megl.runs.load_run` rebuilds everything from it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from megl.errors import UserError

BACKBONES = ("resnet18", "vit_b_16", "mlp", "cnn")  # mlp / cnn: the DecoyMNIST nets (megl.models.small)
GRADCAM_METHODS = ("megl", "gradia", "haics", "res-g", "res-l")  # need a convolutional backbone
MLP_INPUTS = ("unit", "signed")  # the mlp's pixel range: [0, 1] (RRR's) or [-1, 1] (CDEP's); megl.models.small
LLM_PRETRAIN_IMAGES = ("all", "masked")  # whose rationales pretrain the tiny LLM (megl.models.standins)
RATIONALE_PROMPTS = ("label", "image")  # does SDTG's question name the class (megl.models.conversation)
SDTG_GRIDS = ("classifier", "coarser")  # the image slot's grid (megl.models.sdtg)
VISUAL_L1 = ("both", "outside")  # where MEGL's L1 compares Â with the mask (megl.losses.megl)
BACKGROUND_MODES = ("swap", "uniform", "transplant")  # forms of MEGL's background term (megl.losses.megl)
TINY = "tiny"  # the embedded CLIP / LLM: small models pretrained on the run's training split (megl.models.standins)
TINY_RANDOM = "tiny-random"  # the same architectures random-initialised (fast; for tests and smoke runs)
EMBEDDED = (TINY, TINY_RANDOM)
RANDOM_STANDINS = {"clip_model": TINY_RANDOM, "llm": TINY_RANDOM}  # Config overrides: skip pretraining
# The embedded default data (docs/recipe.md §5): the class is the object's colour, faint (contrast 0.4); the corner
# decoy names the class in 95 % of training images and is random in val / test; 20 % of training images are masked.
STORY_DATA = dict(n_train=600, num_classes=6, class_cue="colour", object_contrast=0.4, decoy_strength=0.95,
                  mask_fraction=0.2, min_object_size=0.16, max_object_size=0.25)


class ConfigError(UserError, ValueError):
    """A config value, key or file that cannot be used; the message gives the `--set` or file fix."""


# Numeric fields are checked by their annotation (int / float / Optional), every one: a number must be finite and
# in [least, most], by default >= 0. Only the exceptions are listed here; a field added later is checked as it is.
LIMITS: dict[str, tuple[Optional[float], Optional[float]]] = {
    **{k: (1, None) for k in ("image_size", "epochs", "batch_size", "eval_batch_size", "checkpoint_every",
                              "max_new_tokens", "lora_r", "lora_alpha", "tokenizer_vocab_size", "max_steps_per_epoch",
                              "clip_image_size", "tiny_clip_width", "tiny_clip_layers", "tiny_clip_patch",
                              "tiny_llm_hidden", "tiny_llm_layers", "tiny_llm_heads", "vit_patch_size", "vit_layers",
                              "vit_heads", "vit_hidden", "vit_mlp")},
    "resnet_layer4_stride": (1, 2),
    "lora_dropout": (0, 1),
    "warmup_fraction": (0, 1),
    "min_lr_ratio": (0, 1),
    "bn_momentum": (0, 1),
    "clip_feature_layer": (None, None),  # a block index; negative counts from the end
}


@dataclass
class Config:
    # --- run
    seed: int = 0  # initialisation, data order, dropout
    data_seed: int = 0  # the synthetic data and a seeded split: fixed across seeds, so seeds vary training only
    device: str = "cpu"
    method: str = "megl"  # a name in the registry, megl.methods.list_methods()
    deterministic: bool = True

    # --- data: synthetic (data_root None) or an Object-ME/Action-ME directory
    data_root: Optional[str] = None
    image_size: int = 32
    # overrides of megl.data.synthetic.SyntheticConfig; the default is the decoy story of docs/recipe.md §5
    synthetic: dict = field(default_factory=lambda: dict(STORY_DATA))
    allow_external_paths: bool = False  # read image_path / visual_exp that are absolute or leave data_root (../)

    # --- classifier
    backbone: str = "resnet18"
    classifier_weights: Optional[str] = None  # torchvision state dict (.pth / .safetensors), e.g. ImageNet weights
    # Grad-CAM map of ResNet18 = image / 32 by default (2x2 at 64 px: too coarse to guide). Default here: layer4
    # stride 1 -> image / 16 (4x4 at 64 px) at 1.7x the compute of the stock net (no stem max-pool: 3.8x).
    # Paper presets: the stock net (7x7 at 224 px).
    resnet_stem_maxpool: bool = False  # 32 px, no stem max-pool, layer4 stride 1: 4x4 map of 8 px cells
    resnet_layer4_stride: int = 1
    vit_patch_size: int = 16  # ViT-B/16 shape; the tests use a tiny ViT through the same code
    vit_layers: int = 12
    vit_heads: int = 12
    vit_hidden: int = 768
    vit_mlp: int = 3072
    small_net_channels: int = 1  # mlp / cnn: 1 reads images as grey (channel mean), 3 as RGB
    cnn_gradcam_layer: str = "conv2"  # cnn: Grad-CAM at the second conv (8x8 at 28 px) or the first (24x24)
    mlp_input: str = "unit"  # mlp: pixels in [0, 1] ("unit", RRR's) or [-1, 1] ("signed", CDEP's scaling)
    # any other torchvision model name (or timm:NAME): Grad-CAM layer, default the family's (megl.models.torchvision_backbones)
    target_layer: Optional[str] = None
    # their BatchNorm momentum; None keeps the family's. MobileNetV3 / EfficientNet ship 0.01, tuned for long
    # ImageNet runs: in a short run their eval-mode statistics still lag the weights (docs/gradcam.md)
    bn_momentum: Optional[float] = 0.1

    # --- CLIP vision encoder (frozen)
    # "tiny" (default: pretrained on the run's training split, then frozen; ~10 s on 2 CPU cores, cached),
    # "tiny-random" (the same architecture random-initialised: tests, smoke runs) or an open_clip model name ("ViT-L-14")
    clip_model: str = TINY
    clip_weights: Optional[str] = None  # local checkpoint for open_clip.create_model(pretrained=...)
    clip_image_size: int = 32  # tiny CLIP only (named models use their own size); 4×4 patches = the Grad-CAM grid
    clip_feature_layer: int = -2  # which block's patch tokens (LLaVA: the penultimate)
    tiny_clip_width: int = 64
    tiny_clip_layers: int = 2
    tiny_clip_patch: int = 8
    tiny_clip_context: int = 32  # text tower positions; rationales and class prompts are far shorter

    # --- LLM (Vicuna v1.5 or a tiny Llama) + LoRA
    llm: str = TINY  # "tiny" (pretrained stand-in, ~20 s, cached), "tiny-random" or a directory for from_pretrained
    tokenizer_vocab_size: int = 600  # tiny LLM: BPE vocabulary trained on the rationales and prompts
    tiny_llm_hidden: int = 64
    tiny_llm_layers: int = 2
    tiny_llm_heads: int = 4
    # "all" training images (the slot shows I ⊙ A where there is a mask, else I) or the "masked" ones alone, whose
    # slot shows I ⊙ A as MEGL's does; the same number of steps either way (docs/standins.md)
    llm_pretrain_images: str = "all"
    # SDTG's question: "label" names the class ("Why is this image classified as {label}?"), "image" does not (the
    # paper's T = LLM(V)), so the rationale's class words must be read from the image slot (docs/standins.md)
    rationale_prompt: str = "label"
    # V = V_I + V_A (the paper), or V_A alone (False): then L_text reaches the classifier only through Â, and cannot
    # read the class from the classifier's own features when Â is off the object (docs/recipe.md §6b)
    sdtg_image_tokens: bool = True
    # the image slot's grid: one token per Grad-CAM cell ("classifier", the paper), or the coarser of the
    # classifier's and CLIP's grids ("coarser": what the LLM stand-in was pretrained on; docs/decoy_mnist.md)
    sdtg_grid: str = "classifier"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    gradient_checkpointing: bool = False
    max_new_tokens: int = 32

    # --- loss (docs/methods.md) and ablation switches (paper Table 4)
    lambda_text: float = 0.1  # docs/recipe.md §2: its share of the classifier gradient, and the 10-class decoy run
    lambda_visual: float = 1.0
    kl_weight: float = 1.0  # the KL term's weight inside the visual term, relative to L1 (paper: 1)
    use_visual: bool = True  # L1(Â, A) on annotated samples
    # "both": |Â − A| over the whole map (the paper: A marks where the evidence is); "outside": Â where A = 0 only,
    # for masks that mark what is irrelevant (DecoyMNIST's corners) and so say nothing about where inside A to look
    visual_l1: str = "both"
    use_text: bool = True  # SDTG autoregressive loss
    use_consistency: bool = True  # KL(Â ‖ Ā) on unannotated samples
    # the counterfactual the mask defines, on annotated images; our extension, not in the paper (0 = the paper's
    # objective). swap: another image's object on this one's cleared background gets the pasted label; uniform: the
    # object-less image gets no class. swap at 0.3: chosen on val, 3 seeds (docs/recipe.md §3-4; uniform's best,
    # λ 10, scored 0.878 against 0.988)
    lambda_background: float = 0.3
    background_mode: str = "swap"  # one of BACKGROUND_MODES
    uniform_prior: bool = False  # Ā uniform when no training image has a mask (else such a run is refused)
    saliency_backend: str = "auto"
    # the score whose Grad-CAM the explanation losses supervise: "logit" (classic Grad-CAM) or "log_prob", whose map
    # also shows evidence against the other classes (docs/recipe.md §4: measured, and not better on val)
    saliency_target: str = "logit"
    method_args: dict = field(default_factory=dict)  # hyper-parameters of the comparison methods

    # --- optimisation
    epochs: int = 6  # the default run (docs/recipe.md §5) fits in ~5 min on 2 CPU cores
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 1e-3  # classifier
    lr_projector: float = 1e-3  # W_I, W_A
    lr_lora: float = 1e-3
    weight_decay: float = 0.0
    # recipe (docs/recipe.md): linear warmup over warmup_fraction of all steps, then cosine decay to
    # min_lr_ratio x lr; a constant lr let test accuracy swing by tens of points between epochs
    lr_schedule: str = "cosine"  # "cosine" or "constant"
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.0
    grad_clip: float = 5.0  # max global gradient norm (0: off)
    train_eval_size: int = 300  # training images scored per epoch (train accuracy: is the decoy being read?)
    grad_share_batches: int = 4  # batches per epoch on which each loss term's gradient norm is measured (0: off)
    checkpoint_every: int = 20  # optimiser steps between checkpoints (and at every epoch end)
    num_workers: int = 0
    num_overlays: int = 4
    max_steps_per_epoch: Optional[int] = None  # cap for smoke tests

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: Optional[str] = None) -> "Config":
        """`source`: the file `d` came from, named in the error."""
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            where = f"{source}: " if source else ""
            raise ConfigError(f"{where}unknown config keys {unknown}; valid keys are the fields of megl.config.Config")
        return cls(**d)

    def validate(self) -> "Config":
        for key, value in check_fields(type(self), vars(self)).items():
            setattr(self, key, value)
        self.synthetic = check_fields(_synthetic_config(), self.synthetic, prefix="synthetic.")
        if self.data_root is None:
            try:  # its own range checks
                _synthetic_config()(**{"image_size": self.image_size, "seed": self.data_seed, **self.synthetic})
            except ValueError as e:
                raise ConfigError(f"synthetic: {e} (--set synthetic.KEY=VALUE)") from None
        if self.backbone not in BACKBONES:
            from megl.models.torchvision_backbones import backbone_error, is_supported_backbone

            if not is_supported_backbone(self.backbone):
                raise ConfigError(backbone_error(self.backbone))
        from megl.methods import list_methods

        if self.method not in list_methods():
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(list_methods())} "
                              "(--method NAME)")
        if self.target_layer is not None and self.backbone in BACKBONES:  # it would be silently ignored
            fixed = {"resnet18": "layer4 (resnet_layer4_stride sets its grid)", "vit_b_16": "the last block",
                     "cnn": "cnn_gradcam_layer=conv1|conv2", "mlp": "none (no spatial layer)"}[self.backbone]
            raise ConfigError(f"target_layer applies to torchvision / timm backbones, not megl's {self.backbone}, whose "
                              f"Grad-CAM layer is {fixed}; drop --set target_layer")
        if self.backbone == "mlp" and self.method in GRADCAM_METHODS:
            raise ConfigError(f"method {self.method} needs Grad-CAM, which needs a convolutional backbone: the mlp has "
                              "none; use backbone cnn or resnet18 (plain CE, rrr and cdep run on the mlp)")
        if self.backbone == "vit_b_16" and self.image_size % self.vit_patch_size:
            raise ConfigError(f"image_size {self.image_size} must be a multiple of vit_patch_size {self.vit_patch_size}")
        from megl.losses.common import SALIENCY_TARGETS
        from megl.schedule import SCHEDULES

        for key, choices, example in (
            ("background_mode", BACKGROUND_MODES, "swap"), ("saliency_target", SALIENCY_TARGETS, "NAME"),
            ("llm_pretrain_images", LLM_PRETRAIN_IMAGES, "masked"), ("rationale_prompt", RATIONALE_PROMPTS, "image"),
            ("visual_l1", VISUAL_L1, "outside"), ("sdtg_grid", SDTG_GRIDS, "coarser"),
            ("mlp_input", MLP_INPUTS, "signed"), ("lr_schedule", SCHEDULES, "NAME"),
        ):  # fields with a fixed set of values
            value = getattr(self, key)
            if value not in choices:
                raise ConfigError(f"{key} = {value!r}: choose one of {', '.join(choices)} (--set {key}={example})")
        for key in ("classifier_weights", "clip_weights", "data_root"):
            path = getattr(self, key)
            if path is not None and not os.path.exists(path):
                raise ConfigError(f"{key} = {path!r} does not exist; fix the path (--set {key}=PATH) or drop it")
        if self.llm not in EMBEDDED and not os.path.isdir(self.llm):
            raise ConfigError(
                f"llm = {self.llm!r} is not a directory: give a local Vicuna v1.5 (or Llama) checkpoint "
                f"directory with --set llm=PATH, or use llm=tiny (or tiny-random)"
            )
        return self


def _synthetic_config():
    from megl.data.synthetic import SyntheticConfig

    return SyntheticConfig


def _expect(key: str, value: Any, what: str, example: str, optional: bool) -> ConfigError:
    null = " or null" if optional else ""
    return ConfigError(f"{key} = {value!r} must be {what}{null} (--set {key}={example})")


def check_fields(cls, values: dict, prefix: str = "") -> dict:
    """Check `values` against the annotated fields of the dataclass `cls`: known keys, types (an int is accepted
    for a float and made one), numbers finite and within LIMITS. Returns the values, coerced."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = dict(values)
    for key, value in values.items():
        name = prefix + key
        if key not in fields:
            raise ConfigError(f"{name}: unknown key; valid keys: {', '.join(sorted(fields))} (--set {prefix}KEY=VALUE)")
        kind, optional = hints[key], False
        args = typing.get_args(kind)
        if typing.get_origin(kind) is typing.Union and type(None) in args:
            optional, kind = True, next(a for a in args if a is not type(None))
        if value is None and optional:
            continue
        kind = typing.get_origin(kind) or kind
        f = fields[key]
        default = f.default if f.default is not dataclasses.MISSING else None
        if kind is bool:
            if not isinstance(value, bool):
                raise _expect(name, value, "true or false", "true", optional)
        elif kind in (int, float):
            least, most = LIMITS.get(key, (0, None))
            integer = kind is int
            ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
            ok = ok and not isinstance(value, bool)
            ok = ok and (least is None or value >= least) and (most is None or value <= most)
            if not ok:
                what = ("a positive integer" if integer and least == 1 and most is None else
                        "an integer" if integer and least is None else
                        f"an integer >= {least}" if integer and most is None else
                        f"an integer in [{least}, {most}]" if integer else
                        "a finite number" if least is None else
                        f"a finite number >= {least}" if most is None else f"a finite number in [{least}, {most}]")
                example = default if isinstance(default, (int, float)) and not isinstance(default, bool) else least
                raise _expect(name, value, what, "N" if example is None else str(example), optional)
            if not integer:
                out[key] = float(value)
        elif kind is str:
            if not isinstance(value, str):
                raise _expect(name, value, "a string", "TEXT", optional)
        elif kind in (list, dict):
            if not isinstance(value, kind):
                raise _expect(name, value, f"a JSON {'list' if kind is list else 'object'}",
                              "'[...]'" if kind is list else "'{...}'", optional)
    return out


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
            missing.append(f"{key} ({what}; got {value!r}): pass --set {key}=/path")
    if missing:
        raise ConfigError(f"preset {preset!r} needs local weights that are missing: " + "; ".join(missing))


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
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        head, _, sub = key.partition(".")
        if head not in valid:
            raise ConfigError(f"--set {key}: unknown config key {head!r}; valid keys: {', '.join(sorted(valid))}")
        if sub:
            if not isinstance(d.get(head), dict):
                raise ConfigError(f"--set {key}: {head!r} is not a dict field")
            d[head][sub] = parse_value(value)
        else:
            d[head] = parse_value(value)
    return d


def read_config_file(path) -> dict:
    """A JSON object of Config fields; every problem names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            loaded = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno}: {e.msg})" if isinstance(e, json.JSONDecodeError) else ""
        raise ConfigError(f"{path} is not valid JSON{where}: fix the file") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a config file must hold a JSON object of Config fields")
    return loaded


def resolve(preset: Optional[str] = None, config_file: Optional[str] = None, overrides: Optional[dict] = None,
            sets: Optional[list[str]] = None) -> Config:
    """Build the run config: defaults < preset < config file < explicit overrides < --set pairs."""
    d = Config().to_dict()
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        d.update(PRESETS[preset])
    if config_file is not None:
        loaded = read_config_file(config_file)
        Config.from_dict({**d, **loaded}, source=config_file)  # unknown keys named with the file
        d.update(loaded)
    d.update({k: v for k, v in (overrides or {}).items() if v is not None})
    d = apply_overrides(d, sets or [])
    config = Config.from_dict(d)
    if preset is not None:
        check_preset_paths(config, preset)
    return config.validate()

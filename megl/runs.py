"""Run directories: config, prior, tokenizer, checkpoints and metrics, all written atomically.

    <run>/config.json                   the resolved Config
    <run>/prior.safetensors             Ā, the mean training mask
    <run>/tokenizer/                    the trained tokenizer (llm=tiny / tiny-random)
    <run>/standins/                     the pretrained tiny CLIP / LLM (megl.models.standins)
    <run>/checkpoints/last.safetensors  model tensors, optimiser tensors, RNG states; training state in its metadata
    <run>/checkpoints/last.json         the same training state, readable
    <run>/metrics.json                  one entry per finished epoch
    <run>/overlays/                     saliency overlays of validation images

`load_run(run_dir)` is the one way to reopen a run.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megl.config import EMBEDDED, Config

CHECKPOINT = "checkpoints/last.safetensors"


# ----------------------------------------------------------------------------- atomic writes
def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
    _atomic(Path(path), w)


def write_tensors(path, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    # clone: safetensors refuses tensors that share storage; contiguous CPU copies are always accepted
    flat = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    _atomic(Path(path), lambda tmp: save_file(flat, tmp, metadata=metadata))


# ----------------------------------------------------------------------------- config, prior, tokenizer
def save_config(run_dir, config: Config) -> None:
    write_json(Path(run_dir) / "config.json", config.to_dict())


def load_config(run_dir) -> Config:
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a megl run directory (python -m megl.train "
                                "writes one)")
    return Config.from_dict(json.loads(path.read_text()))


def save_prior(run_dir, prior: torch.Tensor) -> None:
    write_tensors(Path(run_dir) / "prior.safetensors", {"prior": prior})


def load_prior(run_dir) -> torch.Tensor:
    return load_file(str(Path(run_dir) / "prior.safetensors"))["prior"]


def save_tokenizer(run_dir, tokenizer) -> None:
    """Saved into a temporary folder, then renamed into place (a crash leaves no half-written tokenizer)."""
    final = Path(run_dir) / "tokenizer"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".tokenizer."))
    tokenizer.save_pretrained(str(tmp))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def load_run_tokenizer(run_dir, config: Config):
    from megl.models.tokenizer import load_tokenizer

    if config.llm not in EMBEDDED:
        return load_tokenizer(config.llm)
    path = Path(run_dir) / "tokenizer"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the run's tokenizer is missing (the run never got past setup?)")
    return load_tokenizer(str(path))


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(run_dir, model_state: dict[str, torch.Tensor], optimizer_state: dict, rng: dict[str, torch.Tensor],
                    state: dict[str, Any]) -> None:
    """One file holds everything needed to resume, so a single os.replace makes it consistent.

    Tensors: "model/<name>", "optim/<param index>/<key>", "rng/<rank>/<name>" (each rank's RNG states and running
    loss sum). Metadata: {"state", "optim"} as JSON
    (training position and metrics; optimiser param groups and non-tensor per-parameter values).
    """
    tensors = {f"model/{k}": v for k, v in model_state.items()}
    optim_meta: dict[str, Any] = {"param_groups": optimizer_state["param_groups"], "scalars": {}}
    for pid, entries in optimizer_state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{pid}/{key}"] = value
            else:
                optim_meta["scalars"].setdefault(str(pid), {})[key] = value
    tensors.update({f"rng/{k}": v for k, v in rng.items()})
    run_dir = Path(run_dir)
    write_tensors(run_dir / CHECKPOINT, tensors, {"state": json.dumps(state), "optim": json.dumps(optim_meta)})
    write_json(run_dir / "checkpoints" / "last.json", state)


def load_checkpoint(run_dir) -> Optional[tuple[dict, dict, dict, dict]]:
    """(model_state, optimizer_state, rng, state), or None when the run has no checkpoint yet."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model/")}
    rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng/")}
    optim_meta = json.loads(meta["optim"])
    per_param: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, pid, key = k.split("/", 2)
            per_param.setdefault(int(pid), {})[key] = v
    for pid, scalars in optim_meta["scalars"].items():
        per_param.setdefault(int(pid), {}).update(scalars)
    optimizer_state = {"state": per_param, "param_groups": optim_meta["param_groups"]}
    return model_state, optimizer_state, rng, json.loads(meta["state"])


def write_metrics(run_dir, metrics: list[dict]) -> None:
    write_json(Path(run_dir) / "metrics.json", metrics)


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else []


# ----------------------------------------------------------------------------- data and runs
def make_splits(config: Config):
    """The run's data splits: synthetic (config.synthetic overrides) or the on-disk format at data_root."""
    from megl.data import load_splits, synthetic

    if config.data_root is None:
        opts = {"image_size": config.image_size, "seed": config.data_seed, **config.synthetic}
        if opts["image_size"] != config.image_size:
            raise ValueError(f"synthetic.image_size {opts['image_size']} != image_size {config.image_size}; "
                             "set image_size instead")
        return synthetic.make_splits(synthetic.SyntheticConfig(**opts))
    return load_splits(config.data_root, image_size=config.image_size, seed=config.data_seed)


@dataclass
class Run:
    config: Config
    model: Any  # MEGLModel, in eval mode
    splits: dict
    prior: torch.Tensor
    run_dir: Path


def load_run(run_dir, device: str = "cpu") -> Run:
    """Rebuild a run: model from config.json + checkpoint + tokenizer + stand-ins, data splits and prior."""
    from megl.models import build_model, standins

    run_dir = Path(run_dir)
    config = load_config(run_dir)
    ckpt = load_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir / CHECKPOINT} not found: the run has no checkpoint yet")
    splits = make_splits(config)
    tokenizer = load_run_tokenizer(run_dir, config)
    model = build_model(config, splits["train"].class_names, tokenizer, device=device,
                        standins=standins.load_from_run(run_dir, config))
    model.load_checkpoint_state_dict(ckpt[0])
    model.eval()
    return Run(config, model, splits, load_prior(run_dir).to(device), run_dir)

"""Run directories: config, prior, tokenizer, checkpoints and metrics, all written atomically.

    <run>/config.json                   the resolved Config
    <run>/prior.safetensors             Ā, the mean training mask
    <run>/tokenizer/                    the trained tokenizer (llm=tiny / tiny-random)
    <run>/standins/                     the pretrained tiny CLIP / LLM (megl.models.standins)
    <run>/checkpoints/last.safetensors  model tensors, optimiser tensors, RNG states; training state in its metadata
    <run>/checkpoints/last.json         the same training state, readable
                                        (checkpoints/ is a link to a .checkpoints.* folder holding both, swapped
                                        in one rename: the two files always belong to the same step)
    <run>/metrics.json                  one entry per finished epoch
    <run>/overlays/                     saliency overlays of validation images

`load_run(run_dir)` is the one way to reopen a run. Problems with a run directory raise RunError (a UserError).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from megl.config import EMBEDDED, Config
from megl.errors import UserError
from megl.files import STAGING, atomic_write, fsync_dir, remove_stale_temps, write_json

CHECKPOINT = "checkpoints/last.safetensors"
_CHECKPOINT_DIRS = ".checkpoints."  # prefix of the folders checkpoints/ links to


class RunError(UserError):
    """A run directory that cannot be used as asked (missing, corrupt, or not a run)."""


def write_tensors(path, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    # clone: safetensors refuses tensors that share storage; contiguous CPU copies are always accepted
    flat = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    atomic_write(Path(path), lambda tmp: save_file(flat, tmp, metadata=metadata))


def remove_stale_files(run_dir) -> list[Path]:
    """What a killed writer left: temp files, staging folders and checkpoint folders no longer linked."""
    run_dir = Path(run_dir)
    link = run_dir / "checkpoints"
    current = os.readlink(link) if link.is_symlink() else None
    removed = remove_stale_temps(run_dir)
    if link.is_dir():
        removed += remove_stale_temps(link)
    for p in run_dir.glob(_CHECKPOINT_DIRS + "*"):
        if p.name != current and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
            removed.append(p)
    return removed


# ----------------------------------------------------------------------------- config, prior, tokenizer
def save_config(run_dir, config: Config) -> None:
    write_json(Path(run_dir) / "config.json", config.to_dict())


def load_config(run_dir) -> Config:
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise RunError(f"{path} not found: {run_dir} is not a megl run directory (python -m megl.train writes one)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path} is not valid JSON ({e}): restore the run's config.json") from None
    if not isinstance(d, dict):
        raise RunError(f"{path} must hold a JSON object of Config fields")
    return Config.from_dict(d, source=str(path))


def save_prior(run_dir, prior: torch.Tensor) -> None:
    write_tensors(Path(run_dir) / "prior.safetensors", {"prior": prior})


def load_prior(run_dir) -> torch.Tensor:
    return load_file(str(Path(run_dir) / "prior.safetensors"))["prior"]


def save_tokenizer(run_dir, tokenizer) -> None:
    """Saved into a temporary folder, then renamed into place (a crash leaves no half-written tokenizer)."""
    final = Path(run_dir) / "tokenizer"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f"{STAGING}tokenizer."))
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
        raise RunError(f"{path} not found: the run's tokenizer is missing (the run never got past setup?)")
    return load_tokenizer(str(path))


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(run_dir, model_state: dict[str, torch.Tensor], optimizer_state: dict, rng: dict[str, torch.Tensor],
                    state: dict[str, Any]) -> None:
    """One file holds everything needed to resume; it and last.json are written into a new folder that
    checkpoints/ is re-linked to in one rename, so a kill at any moment leaves a consistent pair.

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
    new = Path(tempfile.mkdtemp(dir=run_dir, prefix=_CHECKPOINT_DIRS))
    try:
        write_tensors(new / "last.safetensors", tensors, {"state": json.dumps(state), "optim": json.dumps(optim_meta)})
        write_json(new / "last.json", state)
        _link_checkpoints(run_dir, new)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise


def _link_checkpoints(run_dir: Path, new: Path) -> None:
    """Point checkpoints/ at `new` in one rename, then delete the folder it pointed at before."""
    link = run_dir / "checkpoints"
    old = (run_dir / os.readlink(link)) if link.is_symlink() else None
    if link.is_dir() and not link.is_symlink():  # a run written before checkpoints/ became a link
        old = Path(tempfile.mkdtemp(dir=run_dir, prefix=_CHECKPOINT_DIRS + "old."))
        os.rename(link, old / "checkpoints")
    tmp = run_dir / f".checkpoints.link.{os.getpid()}.tmp"
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(new.name, tmp)  # relative: the run directory can be moved or copied
    os.replace(tmp, link)
    fsync_dir(run_dir)
    if old is not None and old.exists():
        shutil.rmtree(old)


def load_checkpoint(run_dir) -> Optional[tuple[dict, dict, dict, dict]]:
    """(model_state, optimizer_state, rng, state), or None when the run has no checkpoint yet (no checkpoints/).
    A checkpoints/ without its checkpoint file, or a truncated or corrupt one, raises RunError naming it."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        if (Path(run_dir) / "checkpoints").exists():
            raise RunError(f"{path} is missing, though {path.parent} exists: restore the file, or start a new run "
                           "with --out DIR")
        return None
    try:
        return _read_checkpoint(path)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:  # ValueError: bad JSON metadata
        raise RunError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e}); restore it, or start "
                       "a new run with --out DIR") from None


def _read_checkpoint(path: Path) -> tuple[dict, dict, dict, dict]:
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


def restore_model(model, model_state: dict, run_dir) -> None:
    """Load a checkpoint's model tensors, or a RunError when config.json no longer describes that model."""
    try:
        model.load_checkpoint_state_dict(model_state)
    except (ValueError, RuntimeError) as e:  # other keys or shapes: config.json was edited
        detail = str(e).strip().splitlines()[-1].strip()[:200]
        raise RunError(f"{Path(run_dir) / CHECKPOINT} does not fit the model {Path(run_dir) / 'config.json'} "
                       f"describes ({detail}); restore the run's config.json") from None


def write_metrics(run_dir, metrics: list[dict]) -> None:
    write_json(Path(run_dir) / "metrics.json", metrics)


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else []  # written atomically by write_metrics


# ----------------------------------------------------------------------------- data and runs
def check_device(name: str) -> torch.device:
    """The torch.device for a --device value, or a UserError that says what this machine has."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {name!r} is not a device name: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                            f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device



def make_splits(config: Config):
    """The run's data splits: synthetic (config.synthetic overrides) or the on-disk format at data_root."""
    from megl.data import load_splits, synthetic

    if config.data_root is None:
        opts = {"image_size": config.image_size, "seed": config.data_seed, **config.synthetic}
        if opts["image_size"] != config.image_size:
            raise RunError(f"synthetic.image_size {opts['image_size']} != image_size {config.image_size}; "
                             "set image_size instead")
        return synthetic.make_splits(synthetic.SyntheticConfig(**opts))
    return load_splits(config.data_root, image_size=config.image_size, seed=config.data_seed,
                       allow_external_paths=config.allow_external_paths)


@dataclass
class Run:
    config: Config
    model: Any  # the method's model (MEGLModel, or an LLMClassifier for llava / ft-cot), in eval mode
    splits: dict
    prior: torch.Tensor
    run_dir: Path


def require_saliency(run_dir, prog: str) -> None:
    """megl.evaluate and megl.predict draw and score saliency: refuse the run of an LLM method, which has none."""
    from megl.methods import get_method

    method = load_config(run_dir).method
    if get_method(method).kind == "llm":
        raise RunError(f"{run_dir} trained {method}, an LLM classifier that explains in text only, so {prog} (which "
                       f"scores saliency) does not apply: its per-epoch test metrics are in "
                       f"{Path(run_dir) / 'metrics.json'}, and `python -m megl.experiments table2 --methods {method}` "
                       "scores its answers and rationales")


def _checkpoint_of(run_dir: Path):
    ckpt = load_checkpoint(run_dir)
    if ckpt is None:
        raise RunError(f"{run_dir / CHECKPOINT} not found: the run has no checkpoint yet")
    return ckpt


def load_model(run_dir, class_names: Sequence[str], config: Optional[Config] = None, device: str = "cpu",
               ckpt=None):
    """A run's trained model in eval mode: built from config.json + tokenizer + stand-ins, weights from the
    checkpoint (`ckpt`, as load_checkpoint returns it, when the caller has it). `class_names` come from the caller,
    so that the data need not be read."""
    from megl.methods import get_method
    from megl.models import standins

    run_dir = Path(run_dir)
    config = config or load_config(run_dir)
    ckpt = ckpt or _checkpoint_of(run_dir)
    build = get_method(config.method).resolve("build_model")
    model = build(config, list(class_names), load_run_tokenizer(run_dir, config), device=device,
                  standins=standins.load_from_run(run_dir, config))
    restore_model(model, ckpt[0], run_dir)
    return model.eval()


def load_run(run_dir, device: str = "cpu") -> Run:
    """Rebuild a run: model (load_model), data splits and prior."""
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    ckpt = _checkpoint_of(run_dir)  # before reading the data
    splits = make_splits(config)
    model = load_model(run_dir, splits["train"].class_names, config, device, ckpt)
    return Run(config, model, splits, load_prior(run_dir).to(device), run_dir)

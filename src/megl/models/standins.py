"""The pretrained stand-ins (clip_model="tiny", llm="tiny"): where their weights come from and where they live.

    <run>/standins/clip.safetensors    the frozen tiny CLIP of this run   (metadata: cache key, pretraining report)
    <run>/standins/llm.safetensors     the frozen tiny Llama of this run, and the projector it was pretrained with
                                       (it initialises SDTG's W_A; LoRA and the trained projectors are in the checkpoint)
    $MEGL_CACHE/standins/<kind>-<hash>.safetensors   shared cache (default ~/.cache/megl)

The hash is of everything the weights depend on: the data (synthetic options or data_root with its annotation
file's size and mtime, image size, data seed), the architecture, the tokenizer's vocabulary (LLM), the
pretraining recipe and the run seed. `for_run` takes the run directory's copy, else the cache's, else pretrains
(megl.models.pretrain) and writes both; every write is a temporary file + os.replace, and an entry whose stored
key differs from the expected one (or that does not load) is never trusted. `load_from_run` reads the run
directory alone, so a finished run is reopened without the cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from megl.config import TINY

from .conversation import RATIONALE_QUESTIONS

FORMAT = 1  # bump when the pretraining recipe changes in a way the fields below do not capture
KINDS = ("clip", "llm")


def cache_dir() -> Path:
    return Path(os.environ.get("MEGL_CACHE") or Path.home() / ".cache" / "megl") / "standins"


def wanted(config) -> tuple[str, ...]:
    """Which stand-ins the config uses pretrained."""
    return tuple(k for k, name in (("clip", config.clip_model), ("llm", config.llm)) if name == TINY)


def _data_identity(config) -> dict:
    d = {"image_size": config.image_size, "data_seed": config.data_seed}
    if config.data_root is None:
        d["synthetic"] = dict(sorted(config.synthetic.items()))
    else:
        root = Path(config.data_root).resolve()
        ann = root / "exp_annotation.json"
        st = ann.stat() if ann.exists() else None
        d["data_root"] = str(root)
        d["annotation"] = [st.st_size, st.st_mtime_ns] if st else None
    return d


def cache_key(kind: str, config, tokenizer=None) -> dict:
    """The fields the stand-in `kind` is a function of (JSON-able; its hash names the cache entry)."""
    from . import pretrain as P

    if kind == "clip":
        arch = {k: getattr(config, k) for k in ("clip_image_size", "tiny_clip_width", "tiny_clip_layers",
                                                "tiny_clip_patch", "tiny_clip_context")}
        recipe = {"epochs": P.CLIP_EPOCHS, "batch": P.CLIP_BATCH, "lr": P.CLIP_LR}
    elif kind == "llm":
        arch = {k: getattr(config, k) for k in ("tiny_llm_hidden", "tiny_llm_layers", "tiny_llm_heads")}
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
        arch["vocab_sha256"] = hashlib.sha256(vocab.encode()).hexdigest()
        recipe = {"epochs": llm_epochs(config), "batch": P.LLM_BATCH, "lr": P.LLM_LR, "n_visual": P.N_VISUAL}
        if config.llm_pretrain_images != "all":  # the "all" recipe keeps its old key, and so its cached entries
            recipe["images"] = config.llm_pretrain_images
        if config.rationale_prompt != "label":  # likewise: the default prompt keeps the old key
            recipe["prompt"] = config.rationale_prompt
        if config.clip_model == TINY:  # it reads the pretrained CLIP's tokens of this layer
            recipe["clip"] = _digest(cache_key("clip", config))
            recipe["clip_feature_layer"] = config.clip_feature_layer
    else:
        raise ValueError(f"unknown stand-in {kind!r}; one of {KINDS}")
    return {"kind": kind, "format": FORMAT, "data": _data_identity(config), "arch": arch, "recipe": recipe,
            "seed": config.seed}


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _read(path: Path, key: dict) -> Optional[tuple[dict, dict]]:
    """(state dict, report) of an entry whose stored key is `key`; None when absent, foreign or unreadable."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if json.loads(meta.get("key", "null")) != json.loads(json.dumps(key)):
            return None
        return load_file(str(path)), json.loads(meta.get("report", "{}"))
    except Exception as e:  # a damaged file: pretrain again rather than trust it
        warnings.warn(f"ignoring unreadable stand-in weights {path}: {e}")
        return None


def _write(path: Path, state: dict, key: dict, report: dict) -> None:
    from megl.runs import write_tensors  # atomic: temp file + fsync + os.replace

    write_tensors(path, state, {"key": json.dumps(key, sort_keys=True), "report": json.dumps(report)})


PROJECTOR = "sdtg.W_A."  # keys of the LLM stand-in's file that hold its pretraining projector (initialises W_A)


def image_slot_tokens(config, splits, run_dir=None, log=print) -> dict:
    """{"train": ..., "val": ...}: the pretrained CLIP's tokens of each split's images that fill the LLM's image slot
    during its pretraining (`pretrain.clip_tokens`); the CLIP is obtained first (run directory, cache or pretrained)."""
    from . import pretrain as P
    from .clip import tiny_clip

    clip = tiny_clip(config)
    clip.load_state_dict(obtain("clip", config, splits, None, run_dir, log)[0])
    clip.requires_grad_(False)
    return {name: P.clip_tokens(clip, splits[name], config.clip_feature_layer, (P.N_VISUAL_GRID,) * 2)
            for name in ("train", "val") if splits.get(name) is not None and len(splits[name]) > 0}


def _pretrain(kind: str, config, splits, tokenizer, run_dir=None, log=print) -> tuple[dict, dict]:
    from . import pretrain as P
    from .clip import clip_tokenizer, tiny_clip
    from .llm import tiny_llama

    train, val = splits["train"], splits.get("val")
    has_val = val is not None and len(val) > 0
    # the LLM learns to read the pretrained CLIP
    visual = image_slot_tokens(config, splits, run_dir, log) if kind == "llm" and config.clip_model == TINY else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if kind == "clip":
            model, tok = tiny_clip(config), clip_tokenizer(config)
            before = P.clip_report(model, tok, val, _decoy_box(config)) if has_val else None
            report = P.pretrain_clip(model, tok, train, epochs=P.CLIP_EPOCHS, batch_size=P.CLIP_BATCH, lr=P.CLIP_LR,
                                     seed=config.seed)
            if before is not None:
                report["val_before"] = before
                report["val"] = P.clip_report(model, tok, val, _decoy_box(config))
            return {k: v.detach().clone() for k, v in model.state_dict().items()}, report
        model = tiny_llama(config, tokenizer)
        projector = torch.nn.Linear(config.tiny_clip_width, config.tiny_llm_hidden) if visual else None
        names = train.class_names

        question = RATIONALE_QUESTIONS[config.rationale_prompt]

        def ppl():
            return P.perplexity(model, tokenizer, val, names, visual.get("val"), projector, question=question)

        before = ppl() if has_val else None
        report = P.pretrain_llm(model, tokenizer, train, names, visual=visual.get("train"), projector=projector,
                                epochs=llm_epochs(config), batch_size=P.LLM_BATCH, lr=P.LLM_LR, seed=config.seed,
                                images=_pretrain_images(config, train, log), question=question)
        if before is not None:
            report["val_perplexity_before"] = before
            report["val_perplexity"] = ppl()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if projector is not None:
        state.update({PROJECTOR + k: v.detach().clone() for k, v in projector.state_dict().items()})
    return state, report


def llm_epochs(config) -> int:
    from . import pretrain as P

    return P.LLM_EPOCHS if config.rationale_prompt == "label" else P.LLM_EPOCHS_IMAGE_PROMPT


def _pretrain_images(config, train, log=print):
    """The flag per training image of `llm_pretrain_images`, or None for every image. Without a single masked
    image, "masked" falls back to every image (said once)."""
    if config.llm_pretrain_images != "masked":
        return None
    has = train.has_masks
    if not bool(has.any()):
        log("llm_pretrain_images=masked: no training image has a mask, so the LLM stand-in pretrains on every image")
        return None
    return has.tolist()


def split_llm_state(state: dict) -> tuple[dict, dict]:
    """(Llama weights, pretraining projector weights) of an LLM stand-in file."""
    llm = {k: v for k, v in state.items() if not k.startswith(PROJECTOR)}
    proj = {k[len(PROJECTOR):]: v for k, v in state.items() if k.startswith(PROJECTOR)}
    return llm, proj


def _decoy_box(config):
    if config.data_root is not None:
        return None
    from megl.data import synthetic

    return synthetic.decoy_box(synthetic.SyntheticConfig(**{"image_size": config.image_size, "seed": config.data_seed,
                                                            **config.synthetic}))


def obtain(kind: str, config, splits, tokenizer=None, run_dir=None, log=print) -> tuple[dict, dict, str]:
    """(state dict, report, source) for stand-in `kind`: from the run directory, the cache, or pretrained now."""
    key = cache_key(kind, config, tokenizer)
    run_path = Path(run_dir) / "standins" / f"{kind}.safetensors" if run_dir is not None else None
    cached = cache_dir() / f"{kind}-{_digest(key)}.safetensors"
    for source, path in (("run", run_path), ("cache", cached)):
        got = _read(path, key) if path is not None else None
        if got is not None:
            if source == "cache" and run_path is not None:
                _write(run_path, got[0], key, got[1])
            return got[0], got[1], source
    log(f"pretraining the tiny {kind} stand-in (cached in {cached.parent})")
    state, report = _pretrain(kind, config, splits, tokenizer, run_dir, log)
    _write(cached, state, key, report)
    if run_path is not None:
        _write(run_path, state, key, report)
    return state, report, "pretrained"


def _as_weights(states: dict[str, dict]) -> dict[str, dict]:
    """File contents -> build_model's `standins`: {"clip", "llm", "W_A" (when the LLM was pretrained reading CLIP)}."""
    out = dict(states)
    if "llm" in out:
        out["llm"], proj = split_llm_state(out["llm"])
        if proj:
            out["W_A"] = proj
    return out


def for_run(config, splits, tokenizer=None, run_dir=None, log=None) -> dict[str, dict]:
    """build_model's `standins` for the stand-ins the config uses pretrained (see `obtain`); logs a summary."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    states = {}
    for kind in wanted(config):
        state, report, source = obtain(kind, config, splits, tokenizer, run_dir, log)
        log(f"tiny {kind} stand-in ({source}): {summary(kind, report)}")
        states[kind] = state
    return _as_weights(states)


def summary(kind: str, report: dict) -> str:
    if kind == "clip":
        v = report.get("val", {})
        parts = [f"contrastive loss {report['loss_first_epoch']:.3f} -> {report['loss_last_epoch']:.3f}"]
        for k in ("zero_shot_image", "zero_shot_masked_object", "zero_shot_masked_decoy"):
            if k in v:
                parts.append(f"val {k} {v[k]:.3f}")
    else:
        parts = [f"LM loss {report['loss_first_epoch']:.3f} -> {report['loss_last_epoch']:.3f}"]
        if "val_perplexity" in report:
            parts.append(f"val perplexity {report['val_perplexity_before']:.1f} -> {report['val_perplexity']:.2f}")
    return f"{'; '.join(parts)} ({report['seconds']:.1f} s to pretrain)"


def load_from_run(run_dir, config) -> dict[str, dict]:
    """The run's stand-in weights from `<run>/standins/` alone (what megl.runs.load_run uses)."""
    out = {}
    for kind in wanted(config):
        path = Path(run_dir) / "standins" / f"{kind}.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: the run uses the pretrained tiny {kind} but its weights are "
                                    "missing (copy the whole run directory)")
        out[kind] = load_file(str(path))
    return _as_weights(out)


def report_of(run_dir, kind: str) -> dict:
    """The pretraining report stored with a run's stand-in."""
    with safe_open(str(Path(run_dir) / "standins" / f"{kind}.safetensors"), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("report", "{}"))


__all__ = ["cache_dir", "cache_key", "for_run", "load_from_run", "obtain", "report_of", "summary", "wanted"]

"""`python -m megl.train`: train MEGL (or a comparison method) and write a run directory.

With no arguments: the synthetic colour-cue decoy data (megl.config.STORY_DATA), ResNet18 at 32 px (no stem
max-pool, layer4 stride 1: 4×4 Grad-CAM map), the tiny CLIP and LLM pretrained on the training split first and then
frozen (megl.models.standins: cached, so only the first run pays; `--set clip_model=tiny-random --set llm=tiny-random`
skips it), on CPU, 6 epochs of warmup + cosine
(docs/recipe.md). The batch size is per process (global batch = batch_size × processes). Every `checkpoint_every` steps and at every epoch end the full training state (model,
optimiser, RNG states, sampler position) is written atomically, so `--resume RUN_DIR` after a crash (even SIGKILL)
continues exactly where the checkpoint was and, in deterministic mode, ends with the same metrics.

    python -m megl.train                                   # embedded default
    python -m megl.train --method baseline --out runs/base # CE only
    python -m megl.train --ablation text                   # paper Table 4 rows: full, visual+text, text, visual, none
    python -m megl.train --method llava                    # an LLM baseline (megl.methods: list_methods())
    python -m megl.train --preset paper-resnet18 --data-root data/object-me \\
        --set clip_weights=/models/ViT-L-14.bin --set llm=/models/vicuna-7b-v1.5 --device cuda
    torchrun --nproc_per_node=2 -m megl.train --out runs/ddp   # DDP: gloo on CPU, nccl on GPU
    python -m megl.train --resume runs/20250101-120000
"""
from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from megl import runs
from megl.config import EMBEDDED, Config, resolve
from megl.errors import UserError, cli
from megl.losses.common import PARTS
from megl.methods import get_method, list_methods
from megl.schedule import lr_factor, set_lr

# paper Table 4: which explanation modules are on. Its rows are the paper's modules, so they run without megl's
# background term (lambda_background); "full" is megl's default and "paper" the paper's full objective.
_PAPER = dict(lambda_background=0.0)
ABLATIONS = {
    "full": dict(use_visual=True, use_text=True, use_consistency=True),
    "paper": dict(use_visual=True, use_text=True, use_consistency=True, **_PAPER),
    "visual+text": dict(use_visual=True, use_text=True, use_consistency=False, **_PAPER),
    "text": dict(use_visual=False, use_text=True, use_consistency=False, **_PAPER),
    "visual": dict(use_visual=True, use_text=False, use_consistency=False, **_PAPER),
    "none": dict(use_visual=False, use_text=False, use_consistency=False, **_PAPER),
}
METRIC_KEYS = ("accuracy", "precision", "recall", "f1", "miou")


# ----------------------------------------------------------------------------- distributed helpers
class Dist:
    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        runs.check_device(device)
        if device == "cuda":  # one GPU per process under torchrun
            device = f"cuda:{local}"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


# ----------------------------------------------------------------------------- data
class EpochRationales(Dataset):
    """One item per training image; the rationale cycles through the image's references from epoch to epoch."""

    def __init__(self, split, epoch: int):
        self.ds = split.expanded(False)
        self.epoch = epoch

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, k):
        item = self.ds[k]
        refs = item["references"]
        item["rationale"] = refs[(self.epoch + k) % len(refs)]
        return item


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------- evaluation
def evaluate(model, split, config: Config, d: Dist, limit: Optional[int] = None) -> dict:
    """Accuracy, macro P/R/F1 and mIoU (saliency of the predicted class vs the mask, threshold 0.5) on a split,
    sharded over ranks and gathered: the same metric functions and conventions as megl.evaluate.evaluate_split,
    which adds text, faithfulness and the report but runs on one process. `limit`: score an evenly spaced
    subset of that many images (the per-epoch train accuracy). An LLM method's answer that names no class scores
    as wrong, and its macro average runs over the dataset's classes (an extra "no class" id must not count)."""
    from megl.data import collate
    from megl.metrics import classification_metrics

    ds = split.expanded(False)
    llm = get_method(config.method).kind == "llm"
    model.eval()
    preds, labels, ious = [], [], []
    chosen = range(len(ds)) if limit is None or limit >= len(ds) else \
        sorted({k * len(ds) // limit for k in range(limit)})
    idx = list(chosen)[d.rank::d.world]
    for start in range(0, len(idx), config.eval_batch_size):
        batch = to_device(collate([ds[i] for i in idx[start:start + config.eval_batch_size]]), d.device)
        preds += _predict_and_iou(model, batch, ious, llm)
        labels += batch["label"].tolist()
    gathered = d.gather((preds, labels, ious))
    preds = [p for g in gathered for p in g[0]]
    labels = [t for g in gathered for t in g[1]]
    ious = [s for g in gathered for s in g[2]]
    # visual methods: macro over the classes present, as megl.evaluate reports it
    out = classification_metrics(labels, preds, labels=range(len(ds.class_names)) if llm else None)
    out["miou"] = sum(ious) / len(ious) if ious else None
    return {k: out[k] for k in METRIC_KEYS}


def _predict_and_iou(model, batch: dict, ious: list, llm: bool) -> list[int]:
    """Predicted classes of a batch; appends the IoU of each annotated sample's saliency (none without Grad-CAM:
    mlp, LLM methods). An LLM answer naming no class is the id num_classes."""
    from megl.metrics import iou

    if llm:
        ids = model.predict(batch["image"]).class_ids
        return torch.where(ids < 0, len(model.class_names), ids).tolist()
    if not model.classifier.has_gradcam:
        with torch.no_grad():
            return model.classifier(batch["image"]).logits.argmax(1).tolist()
    logits, sal = model.explain(batch["image"])
    scores = iou(sal.saliency.float(), batch["mask"])
    ious += [float(s) for s, h in zip(scores.cpu(), batch["has_mask"].cpu()) if h]
    return logits.argmax(1).tolist()


def write_overlays(model, split, run_dir: Path, n: int, device) -> None:
    from megl.data import collate
    from megl.files import safe_stem
    from megl.overlays import save_panel

    ds = split.expanded(False)
    if n <= 0 or len(ds) == 0 or not model.classifier.has_gradcam:
        return
    items = [ds[i] for i in range(min(n, len(ds)))]
    batch = to_device(collate(items), device)
    _, sal = model.explain(batch["image"])
    used: set[str] = set()
    for i, item in enumerate(items):
        mask = batch["mask"][i] if item["has_mask"] else None
        name = safe_stem(item["id"], used)  # ids come from the dataset: "../x" must not leave overlays/
        save_panel(run_dir / "overlays" / f"{name}.png", batch["image"][i], sal.saliency[i], mask)


# ----------------------------------------------------------------------------- RNG state
def rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    state["python"] = torch.tensor(list(random.getstate()[1]), dtype=torch.int64)
    return state


def set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None))


def seed_epoch(config: Config, epoch: int, rank: int) -> None:
    """Every epoch starts from RNG states that are a function of (seed, epoch, rank) alone."""
    s = config.seed * 1_000_003 + epoch * 1009 + rank
    torch.manual_seed(s)
    random.seed(s)


# ----------------------------------------------------------------------------- training
def make_optimizer(model, config: Config) -> torch.optim.Optimizer:
    groups = model.parameter_groups()
    lrs = {"classifier": config.lr, "projector": config.lr_projector, "lora": config.lr_lora}
    param_groups = [{"params": ps, "lr": lrs[name], "name": name} for name, ps in groups.items() if ps]
    # fused: one kernel over all tensors (CPU and CUDA); the per-tensor loop dominates small CPU steps
    return torch.optim.AdamW(param_groups, weight_decay=config.weight_decay, fused=True)


def total_steps(n_items: int, config: Config, world: int) -> int:
    """Optimiser steps of the whole run (the cosine schedule's length)."""
    per_epoch = math.ceil(math.ceil(n_items / world) / config.batch_size)
    if config.max_steps_per_epoch is not None:
        per_epoch = min(per_epoch, config.max_steps_per_epoch)
    return per_epoch * config.epochs


def term_grad_norms(parts: dict, params: list) -> dict[str, float]:
    """‖∂ part / ∂ classifier parameters‖ for each weighted summand of the loss (graph kept for the real
    backward): which term drives the classifier."""
    out = {}
    for name, t in parts.items():
        if not t.requires_grad:
            out[name] = 0.0
            continue
        grads = torch.autograd.grad(t, params, retain_graph=True, allow_unused=True)
        out[name] = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))
    return out


def grad_share_summary(sums: dict, n: int) -> dict:
    """Per-epoch mean gradient norm of each term and its share of their sum."""
    if not n:
        return {}
    norms = {k: v / n for k, v in sums.items()}
    total = sum(norms.values()) or 1.0
    return {"grad_norm": norms, "grad_share": {k: v / total for k, v in norms.items()}}


def save_state(run_dir, model, optimizer, state, d: Dist) -> None:
    # per rank: its RNG states and its running loss sum (each rank's shard differs)
    mine = {k: v.cpu() for k, v in rng_state(d.device).items()}
    mine["loss"] = torch.tensor([state["loss_sum"], float(state["loss_n"])], dtype=torch.float64)
    per_rank = d.gather(mine)
    if d.main:
        flat = {f"{r}/{k}": v for r, s in enumerate(per_rank) for k, v in s.items()}
        runs.save_checkpoint(run_dir, model.checkpoint_state_dict(), optimizer.state_dict(), flat, state)
    d.barrier()


LOG_SPLITS = ("val", "test")  # the splits whose accuracy the per-epoch log line shows


def train(config: Config, run_dir: Path, d: Dist, resume: bool = False, progress: bool = True,
          log_splits: Sequence[str] = LOG_SPLITS) -> list[dict]:
    from megl.data import collate, mean_mask_prior
    from megl.models import standins
    from megl.models.tokenizer import train_tokenizer

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=d.device.type == "cuda")
    t0 = time.time()
    # everything that can refuse the run happens before the first write: a resume needs a readable checkpoint
    ckpt = runs.load_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        raise runs.RunError(f"{run_dir} has no checkpoint ({run_dir / runs.CHECKPOINT} not found): nothing to "
                            "resume; start a new run with --out DIR")
    splits = runs.make_splits(config)
    train_split = splits["train"]
    class_names = train_split.class_names
    needs_prior = config.method == "megl" and config.use_consistency and not config.uniform_prior
    if needs_prior and not bool(train_split.has_masks.any()):
        raise UserError(f"no training image has a mask ({train_split.num_images} images), so --method megl has no "
                        "mean-mask prior for its consistency loss: add masks (visual_exp), or pass --set "
                        "use_consistency=false, --method baseline, or --set uniform_prior=true")
    prior = mean_mask_prior(train_split, on_missing="error" if needs_prior else "uniform").to(d.device)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.remove_stale_files(run_dir)
        runs.save_config(run_dir, config)
        runs.save_prior(run_dir, prior)
        if config.llm in EMBEDDED and not (run_dir / "tokenizer").exists():
            texts = [t for r in train_split.records for t in r.references]
            runs.save_tokenizer(run_dir, train_tokenizer(texts, class_names, config.tokenizer_vocab_size))
    d.barrier()
    tokenizer = runs.load_run_tokenizer(run_dir, config)
    if d.main:  # pretrained tiny CLIP / LLM: from the run directory, the shared cache, or pretrained now
        standins.for_run(config, splits, tokenizer, run_dir)
    d.barrier()
    method = get_method(config.method)
    model = method.resolve("build_model")(config, class_names, tokenizer, device=d.device,
                                          standins=standins.load_from_run(run_dir, config))
    optimizer = make_optimizer(model, config)
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "loss_sum": 0.0, "loss_n": 0, "metrics": [],
             "share_sum": {}, "share_n": 0}
    if ckpt is not None:
        model_state, optim_state, rng, state = ckpt
        state = {"share_sum": {}, "share_n": 0, **state}
        runs.restore_model(model, model_state, run_dir)
        optimizer.load_state_dict(optim_state)
        mine = {k.split("/", 1)[1]: v for k, v in rng.items() if k.startswith(f"{d.rank}/")}
        if not mine:
            raise runs.RunError(f"checkpoint in {run_dir} has no RNG state for rank {d.rank}: resume with the same "
                                "number of processes it was written with")
        if state["step_in_epoch"] > 0:
            set_rng_state(mine, d.device)
        if "loss" in mine:  # this rank's own running loss, not rank 0's
            state["loss_sum"], state["loss_n"] = float(mine["loss"][0]), int(mine["loss"][1])
        if d.main:
            print(f"resuming {run_dir} at epoch {state['epoch']} step {state['step_in_epoch']}", file=sys.stderr)
    net = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # find_unused_parameters: ablations and the baseline leave SDTG / LoRA without gradient
        net = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                  find_unused_parameters=True)

    from tqdm import tqdm

    base_lrs = {g["name"]: {"classifier": config.lr, "projector": config.lr_projector, "lora": config.lr_lora}[g["name"]]
                for g in optimizer.param_groups}
    steps = total_steps(len(train_split.expanded(False)), config, d.world)
    clf_params = model.parameter_groups().get("classifier", [])  # LLM methods have no classifier
    trainable = [p for g in optimizer.param_groups for p in g["params"]]

    for epoch in range(state["epoch"], config.epochs):
        data = EpochRationales(train_split, epoch)
        sampler = DistributedSampler(data, num_replicas=d.world, rank=d.rank, shuffle=True, seed=config.seed)
        sampler.set_epoch(epoch)
        order = list(sampler)
        batches = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        if config.max_steps_per_epoch is not None:
            batches = batches[:config.max_steps_per_epoch]
        start = state["step_in_epoch"]
        if start == 0:
            seed_epoch(config, epoch, d.rank)
            state.update(loss_sum=0.0, loss_n=0, share_sum={}, share_n=0)
        # batches whose per-term gradient norms are measured (one process only: DDP's reducer expects one backward)
        every = max(1, len(batches) // config.grad_share_batches) \
            if config.grad_share_batches and d.world == 1 and clf_params else None
        # own generator: creating an iterator would otherwise draw from the global RNG, which a resumed run
        # restores from the checkpoint (that draw would shift every later dropout mask)
        loader = DataLoader(data, batch_sampler=batches[start:], collate_fn=collate, num_workers=config.num_workers,
                            generator=torch.Generator().manual_seed(config.seed + epoch))
        model.train()
        bar = tqdm(loader, total=len(batches), initial=start, desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not (progress and d.main), dynamic_ncols=True, file=sys.stderr)
        t_epoch = time.time()  # training time only (no evaluation): the per-epoch cost that methods are compared on
        for bi, batch in enumerate(bar, start=start):
            terms = net(to_device(batch, d.device), prior)
            parts = terms.pop(PARTS, {})
            if every is not None and bi % every == 0 and bi // every < config.grad_share_batches:
                for k, v in term_grad_norms(parts, clf_params).items():
                    state["share_sum"][k] = state["share_sum"].get(k, 0.0) + v
                state["share_n"] += 1
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            set_lr(optimizer, base_lrs, lr_factor(state["global_step"], steps, schedule=config.lr_schedule,
                                                  warmup_fraction=config.warmup_fraction,
                                                  min_lr_ratio=config.min_lr_ratio))
            optimizer.step()
            loss = float(terms["total"].detach())
            state["loss_sum"] += loss
            state["loss_n"] += 1
            state["step_in_epoch"] = bi + 1
            state["global_step"] += 1
            bar.set_postfix({k: f"{float(v.detach()):.3f}" for k, v in terms.items()}, refresh=False)
            if state["global_step"] % config.checkpoint_every == 0 and bi + 1 < len(batches):
                save_state(run_dir, model, optimizer, state, d)
        bar.close()
        loss_sum = torch.tensor([state["loss_sum"], float(state["loss_n"])], dtype=torch.float64)
        if d.world > 1:
            dist.all_reduce(loss_sum)
            # BatchNorm statistics drift apart per rank (DDP syncs them only at the next forward): take rank 0's,
            # which are also the ones the checkpoint stores
            for buf in model.buffers():
                dist.broadcast(buf, src=0)
        entry = {"epoch": epoch + 1, "train_loss": float(loss_sum[0] / max(loss_sum[1], 1)),
                 "train_seconds": round(time.time() - t_epoch, 3), "lr": optimizer.param_groups[0]["lr"]}
        entry.update(grad_share_summary(state["share_sum"], state["share_n"]))
        if config.train_eval_size:
            entry["train"] = evaluate(model, train_split, config, d, limit=config.train_eval_size)
        for name in ("val", "test"):
            if len(splits[name]):
                entry[name] = evaluate(model, splits[name], config, d)
        state["metrics"].append(entry)
        state.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0, loss_n=0, share_sum={}, share_n=0)
        save_state(run_dir, model, optimizer, state, d)
        if d.main:
            runs.write_metrics(run_dir, state["metrics"])
            if method.kind == "visual":  # LLM methods explain in text only
                write_overlays(model, splits["val"], run_dir, config.num_overlays, d.device)
            print(format_entry(entry, log_splits), file=sys.stderr)
    if d.main:
        print(f"done in {time.time() - t0:.1f} s; run directory: {run_dir}", file=sys.stderr)
    return state["metrics"]


def format_entry(entry: dict, splits: Sequence[str] = LOG_SPLITS) -> str:
    parts = [f"epoch {entry['epoch']}: train loss {entry['train_loss']:.4f}"]
    if "grad_share" in entry:
        parts.append("grad share " + " ".join(f"{k} {v:.2f}" for k, v in entry["grad_share"].items()))
    if "train" in entry:
        parts.append(f"train acc {entry['train']['accuracy']:.4f}")
    for name in splits:
        if name in entry:
            m = entry[name]
            miou = "n/a" if m["miou"] is None else f"{m['miou']:.4f}"
            parts.append(f"{name} acc {m['accuracy']:.4f} F1 {m['f1']:.4f} mIoU {miou}")
    return " | ".join(parts)


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m megl.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="JSON file of Config fields")
    ap.add_argument("--preset", help="paper-resnet18 or paper-vit-b16 (needs local weights)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any Config field (JSON values; synthetic.n_train=200 for dict fields)")
    ap.add_argument("--data-root", help="Object-ME / Action-ME directory (default: synthetic data)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--out", help="run directory (default runs/<timestamp>)")
    ap.add_argument("--backbone", help="resnet18 or vit_b_16 (megl's), any torchvision classification model "
                    "(mobilenet_v3_small, efficientnet_b0, swin_t, ...) or timm:NAME; --set target_layer=PATH "
                    "overrides the family's Grad-CAM layer")
    ap.add_argument("--device", help="cpu, cuda, cuda:1 ...")
    ap.add_argument("--method", help=f"one of {', '.join(list_methods())} (default megl)")
    ap.add_argument("--ablation", choices=tuple(ABLATIONS), help="MEGL modules on (paper Table 4)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    ap.add_argument("--force", action="store_true",
                    help="write into an --out directory that is not empty (its files of the same names are replaced)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return ap.parse_args(argv)


def build_config(args) -> tuple[Config, Optional[Path], bool]:
    if args.resume:
        run_dir = Path(args.resume)
        config = runs.load_config(run_dir)
        d = config.to_dict()
        for key in ("epochs", "device"):
            if getattr(args, key) is not None:
                d[key] = getattr(args, key)
        ignored = [k for k in ("config", "preset", "data_root", "backbone", "method", "ablation", "batch_size", "seed")
                   if getattr(args, k)] + (["--set"] if args.set else [])
        if ignored:
            raise UserError(f"--resume continues the run as configured in {run_dir}/config.json; only --epochs and "
                             f"--device may change (got {', '.join(ignored)})")
        return Config.from_dict(d, source=str(run_dir / "config.json")).validate(), run_dir, True
    overrides = {"data_root": args.data_root, "epochs": args.epochs, "backbone": args.backbone, "device": args.device,
                 "method": args.method, "batch_size": args.batch_size, "seed": args.seed}
    if args.ablation:
        overrides.update(ABLATIONS[args.ablation])
    config = resolve(args.preset, args.config, overrides, args.set)
    return config, Path(args.out) if args.out else None, False


def out_dir_problem(run_dir: Path, force: bool) -> Optional[str]:
    """Why a new run must not write into `run_dir` (None: it may): a run or other files are there."""
    entries = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if run_dir.exists() and not run_dir.is_dir():
        return f"--out {run_dir} is a file, not a directory; choose another --out"
    if not entries or force:
        return None
    if "checkpoints" in entries:
        return (f"{run_dir} already holds a run; continue it with --resume {run_dir}, choose another --out, or pass "
                "--force to train a new run over it")
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    return f"--out {run_dir} is not empty ({shown}); choose a new or empty directory, or pass --force to write into it"


@cli("megl.train")
def main(argv=None) -> int:
    args = parse_args(argv)
    config, run_dir, resume = build_config(args)
    d = Dist(config.device)
    if run_dir is None:
        run_dir = Path(d.broadcast("runs/" + datetime.now().strftime("%Y%m%d-%H%M%S")))
    # rank 0 decides, before any rank writes, so a fast rank's config.json cannot make another refuse
    problem = d.broadcast(out_dir_problem(run_dir, args.force) if d.main and not resume else None)
    if problem:
        raise UserError(problem)
    new_dir = not resume and not (run_dir.is_dir() and any(run_dir.iterdir()))
    try:
        train(config, run_dir, d, resume=resume, progress=not args.no_progress)
    except UserError:
        # refused during setup (weights, data): a directory this run created holds nothing worth keeping, and
        # left in place it would make the corrected command refuse a non-empty --out
        if new_dir and d.main and not (run_dir / "checkpoints").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

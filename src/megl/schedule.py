"""Learning-rate schedule: linear warmup, then cosine decay to `min_lr_ratio` of the base rate.

The factor is a pure function of the global step, so the schedule needs no state of its own: a resumed run
recomputes it from the checkpointed `global_step` and matches an uninterrupted one.
"""
from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, total_steps: int, *, schedule: str = "cosine", warmup_fraction: float = 0.0,
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate for optimiser step `step` (0-based) of `total_steps`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if schedule == "constant":
        return 1.0
    warmup = int(round(warmup_fraction * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    span = max(total_steps - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, base_lrs: dict[str, float], factor: float) -> None:
    """Set every param group's lr to its base rate (looked up by the group's "name") times `factor`."""
    for group in optimizer.param_groups:
        group["lr"] = base_lrs[group["name"]] * factor

"""Learning-rate schedules: linear warmup, then cosine, linear or constant.

The factor of optimizer step ``s`` (0-based, the step about to be taken) follows transformers'
``get_{cosine,linear,constant}_schedule_with_warmup``, so a run here and one with those
schedulers use the same learning rates: ``s / warmup`` during warmup (the very first step has
learning rate 0 when there is warmup), then a decay to 0 at ``total`` steps.
"""

from __future__ import annotations

import math

from cudablocks.errors import InvalidArgumentError

__all__ = ["SCHEDULES", "lr_factor"]

SCHEDULES: tuple[str, ...] = ("cosine", "linear", "constant")


def lr_factor(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """The multiplier of the peak learning rate at 0-based optimizer step ``step``."""
    if schedule not in SCHEDULES:
        raise InvalidArgumentError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if total < 1 or warmup < 0:
        raise InvalidArgumentError(f"need total >= 1 and warmup >= 0 steps, got total={total}, warmup={warmup}")
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

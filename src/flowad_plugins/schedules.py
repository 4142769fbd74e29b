"""Learning-rate schedules shared by the flow models (stepped once per training batch), and the callback that fits
them to a training time budget (``trainer.max_time``)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, Timer
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

LR_SCHEDULES = ("constant", "cosine")
# a run is cut by the Timer at the first batch past the budget: aim the end of the decay a little before it
BUDGET_MARGIN = 0.97


class WarmupCosine:
    """LR factor per step: linear warm-up over the first ``warmup_steps``, then cosine decay to ``min_lr_ratio``.

    ``total_steps`` can be shortened during training (``fit_to``); the warm-up stays as it was. Being an object,
    not a closure, ``LambdaLR`` saves its attributes in checkpoints, so a resumed run continues the same curve.
    """

    def __init__(self, total_steps: int | float, warmup_fraction: float = 0.05, min_lr_ratio: float = 1e-3) -> None:
        if not 0 <= warmup_fraction < 1:
            msg = f"warmup_fraction must be in [0, 1), got {warmup_fraction}."
            raise ValueError(msg)
        known = math.isfinite(total_steps) and total_steps >= 1
        self.total_steps = int(total_steps) if known else 0  # 0: unknown length, constant after warm-up
        self.planned_steps = self.total_steps
        self.warmup_steps = int(warmup_fraction * self.total_steps)
        self.min_lr_ratio = min_lr_ratio

    def fit_to(self, total_steps: int) -> None:
        """End the decay at ``total_steps`` (never later than planned, never inside the warm-up)."""
        limit = self.planned_steps if self.planned_steps else total_steps
        self.total_steps = max(self.warmup_steps + 1, min(limit, int(total_steps)))

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if not self.total_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int | float,
    warmup_fraction: float = 0.05,
    min_lr_ratio: float = 1e-3,
) -> LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of ``total_steps``, then cosine decay to ``min_lr_ratio``·lr.

    An unknown length (``total_steps`` infinite or < 1, e.g. ``max_epochs=-1``) keeps the LR constant
    after warm-up, unless ``FitScheduleToTimeBudget`` gives it one.
    """
    return LambdaLR(optimizer, WarmupCosine(total_steps, warmup_fraction, min_lr_ratio))


class FitScheduleToTimeBudget(Callback):
    """With ``trainer.max_time`` set, end every ``WarmupCosine`` decay when the time budget ends.

    Lightning's ``Timer`` stops training when ``max_time`` is spent, whatever the epoch: a schedule planned for
    ``max_epochs`` would be cut while the LR is still high. After every training epoch (its validation included)
    this callback measures the seconds per step so far and moves the end of the decay to the last step that fits
    in the time left. Without ``max_time``, or when all ``max_epochs`` fit, the schedule is unchanged.
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        del pl_module
        timer = next((callback for callback in trainer.callbacks if isinstance(callback, Timer)), None)
        remaining = None if timer is None else timer.time_remaining()
        if remaining is None:
            return
        elapsed = timer.time_elapsed()
        for config in trainer.lr_scheduler_configs:
            steps_done = config.scheduler.last_epoch  # LambdaLR counts its steps here
            if steps_done < 1:
                continue
            steps_left = math.floor(BUDGET_MARGIN * max(0.0, remaining) * steps_done / max(elapsed, 1e-9))
            for factor in getattr(config.scheduler, "lr_lambdas", []):
                if isinstance(factor, WarmupCosine):
                    factor.fit_to(steps_done + steps_left)

"""The warm-up + cosine schedule and its fit to a training time budget (no training: a stand-in trainer)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Timer

from flowad_plugins.schedules import BUDGET_MARGIN, FitScheduleToTimeBudget, WarmupCosine, warmup_cosine


def _scheduler(total_steps: float, steps_done: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_cosine(optimizer, total_steps, warmup_fraction=0.1)
    for _ in range(steps_done):
        optimizer.step()
        scheduler.step()
    return scheduler


class _StoppedTimer(Timer):
    """A timer frozen at ``elapsed`` seconds of a ``budget``-second run."""

    def __init__(self, budget: float, elapsed: float) -> None:
        super().__init__(duration={"seconds": budget})
        self.elapsed = elapsed

    def time_elapsed(self, stage: str = "train") -> float:
        return self.elapsed


def test_warmup_then_cosine_decay_to_the_floor() -> None:
    factor = WarmupCosine(100, warmup_fraction=0.1, min_lr_ratio=1e-3)
    assert factor(0) == pytest.approx(1 / 11) and factor(9) == pytest.approx(10 / 11)
    assert factor(10) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(1e-3 + (1 - 1e-3) * 0.5)
    assert factor(100) == factor(500) == pytest.approx(1e-3)
    assert WarmupCosine(float("inf"), warmup_fraction=0.1)(50) == 1.0  # unknown length: constant


def test_fit_to_shortens_but_never_extends_the_plan_or_cuts_the_warmup() -> None:
    factor = WarmupCosine(100, warmup_fraction=0.1)
    factor.fit_to(40)
    assert factor.total_steps == 40 and factor(40) == pytest.approx(1e-3)
    factor.fit_to(1000)
    assert factor.total_steps == 100
    factor.fit_to(3)
    assert factor.total_steps == factor.warmup_steps + 1


def test_the_decay_ends_when_the_time_budget_does() -> None:
    # 20 of 100 planned steps took 60 of 120 s: 20 more steps fit, so the decay ends near step 40
    scheduler = _scheduler(100, steps_done=20)
    trainer = SimpleNamespace(callbacks=[_StoppedTimer(budget=120, elapsed=60)],
                              lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)])
    FitScheduleToTimeBudget().on_train_epoch_end(trainer, None)
    fitted = scheduler.lr_lambdas[0]
    assert fitted.total_steps == 20 + int(BUDGET_MARGIN * 20)
    state = scheduler.state_dict()  # a resumed run continues the fitted curve
    restored = _scheduler(100)
    restored.load_state_dict(state)
    assert restored.lr_lambdas[0].total_steps == fitted.total_steps


def test_without_max_time_or_with_time_to_spare_the_schedule_is_unchanged() -> None:
    scheduler = _scheduler(100, steps_done=20)
    FitScheduleToTimeBudget().on_train_epoch_end(
        SimpleNamespace(callbacks=[], lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)]), None)
    assert scheduler.lr_lambdas[0].total_steps == 100
    roomy = SimpleNamespace(callbacks=[_StoppedTimer(budget=1000, elapsed=10)],
                            lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)])
    FitScheduleToTimeBudget().on_train_epoch_end(roomy, None)
    assert scheduler.lr_lambdas[0].total_steps == 100


def test_every_flow_model_fits_its_schedule_to_the_budget() -> None:
    from flowad_plugins import FastFlow

    model = FastFlow(backbone="resnet18", pre_trained=False, flow_steps=1, lr_schedule="cosine")
    assert any(isinstance(callback, FitScheduleToTimeBudget) for callback in model.configure_callbacks())
    with pytest.raises(ValueError, match=r"lr_schedule='step' is not supported; allowed values: \['constant'"):
        FastFlow(backbone="resnet18", pre_trained=False, flow_steps=1, lr_schedule="step")

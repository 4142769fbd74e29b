"""The drift conditions of the decision study (``decisions.py``) and the image-score variants it compares.

Drift: ±2/255 brightness, a ±8 px shift of the frame (the border reflected), the backbone in bf16 (torch autocast).
Variants: the plain maximum of the score map (shipped), the map standardised per position with shrunk std
(``PositionStatistics``, with and without statistics of shifted maps), the plain maximum of the map the other
aggregation combines, and the maximum without a border (``MARGINS``). ``RandomReflectShift``: the shift drift, drawn
at random, as a training augmentation (``decisions.py --train-shift``).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

# image-score variants: (per-position std shrinkage λ, map jitter as a share of the shorter side); None = plain max
# "plain_max" is the shipped score (the maximum of the map, smoothed by the model's score_blur_sigma)
VARIANTS: dict[str, tuple[float, float] | None] = {
    "plain_max": None, "shrink_0": (1e-3, 0.0), "shrink_0.25": (0.25, 0.0), "shrink_0.5": (0.5, 0.0),
    "shrink_1": (1.0, 0.0), "shrink_0.25_jitter64": (0.25, 1 / 64), "shrink_0.5_jitter64": (0.5, 1 / 64),
    "shrink_1_jitter64": (1.0, 1 / 64), "shrink_0.5_jitter32": (0.5, 1 / 32),
}
# plain-maximum variants that leave a border of the score map out (a share of the shorter side of the input)
MARGINS = {"plain_max_margin1/32": 1 / 32, "plain_max_margin1/16": 1 / 16}
BRIGHTNESS = 2 / 255
SHIFT = 8
CONDITIONS = ("clean", "bright+2", "bright-2", "shift+8", "shift-8", "bf16")


def reflect_shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``x`` (``…×H×W``, any dtype) with its content moved by ``dy``, ``dx`` px, the uncovered border reflected."""
    margin = max(abs(dy), abs(dx))
    if margin == 0:
        return x
    planes = x.reshape(1, -1, *x.shape[-2:]).float()
    padded = F.pad(planes, (margin, margin, margin, margin), mode="reflect")
    height, width = x.shape[-2:]
    window = padded[..., margin - dy: margin - dy + height, margin - dx: margin - dx + width]
    return window.reshape(x.shape).to(x.dtype)


def drifted(images: torch.Tensor, condition: str, pre_processor) -> torch.Tensor:
    """``images`` (``B×3×H×W`` in [0, 1], the dataset's own frame) drifted, then pre-processed: brightness ±2/255, or
    a shift by ±8 px of the frame along both axes (the uncovered border reflected)."""
    if condition.startswith("bright"):
        images = (images + (BRIGHTNESS if condition.endswith("+2") else -BRIGHTNESS)).clamp(0, 1)
    if condition.startswith("shift"):
        step = SHIFT if condition.endswith("+8") else -SHIFT
        images = reflect_shift(images, step, step)
    return pre_processor(images)


def autocast_for(condition: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=condition == "bf16")


@torch.no_grad()
def maps_by_aggregation(model, inputs: torch.Tensor, condition: str) -> dict[str, torch.Tensor]:
    """``{aggregation: B×1×H×W}``: the unsmoothed score maps of pre-processed ``inputs`` (the backbone in bf16 for
    ``"bf16"``), from one forward pass, the scales combined by each of ``AnomalyScorer.AGGREGATIONS``."""
    scorer = model.model.scorer
    shipped = scorer.aggregation
    with autocast_for(condition):
        log_likelihoods = model.model.likelihood_maps(inputs)
    maps = {}
    try:
        for aggregation in scorer.AGGREGATIONS:
            scorer.aggregation = aggregation
            maps[aggregation] = scorer.score_map(log_likelihoods, inputs.shape[-2:]).float()
    finally:
        scorer.aggregation = shipped
    return maps


def score_maps(model, inputs: torch.Tensor, condition: str) -> torch.Tensor:
    """The unsmoothed ``B×1×H×W`` score maps of the model's own aggregation (see ``maps_by_aggregation``)."""
    return maps_by_aggregation(model, inputs, condition)[model.model.scorer.aggregation]


def other_aggregation(model) -> str:
    """The aggregation the model does not ship (the ``plain_max_<aggregation>`` variant of the study)."""
    scorer = model.model.scorer
    return next(name for name in scorer.AGGREGATIONS if name != scorer.aggregation)


class PositionStatistics:
    """Per-position mean and shrunk std of normal training maps (the per-position variants of the image score):
    ``σ_eff² = σ_p² + λ²·mean_p(σ_p²)``; ``λ ≈ 0`` is the former release's score (std floored near 0)."""

    def fit(self, maps, shrink: float) -> None:
        sums = None
        for batch in maps:
            values = batch.double().reshape(-1, *batch.shape[-2:])
            part = torch.stack([torch.full(values.shape[1:], float(len(values)), dtype=torch.float64),
                                values.sum(dim=0), values.pow(2).sum(dim=0)])
            sums = part if sums is None else sums + part
        count, total, squares = sums
        self.mean = total / count
        variance = (squares / count - self.mean.pow(2)).clamp_min(0)
        self.std = (variance + shrink**2 * variance.mean().clamp_min(1e-12)).sqrt()

    def standardise(self, maps: torch.Tensor) -> torch.Tensor:
        return ((maps.double() - self.mean) / self.std).float()


def shifted_copies(maps: torch.Tensor, shift: int) -> torch.Tensor:
    """``maps`` (``B×1×H×W``) and its copies shifted by ``shift`` pixels along each axis and diagonal (borders
    replicated): ``9B×1×H×W`` (the jitter variants)."""
    if shift <= 0:
        return maps
    padded = F.pad(maps, (shift, shift, shift, shift), mode="replicate")
    height, width = maps.shape[-2:]
    return torch.cat([padded[..., shift + dy: shift + dy + height, shift + dx: shift + dx + width]
                      for dy in (-shift, 0, shift) for dx in (-shift, 0, shift)])


def variant_statistics(train_maps: torch.Tensor) -> dict[str, PositionStatistics | None]:
    statistics = {}
    for name, setting in VARIANTS.items():
        if setting is None:
            statistics[name] = None
            continue
        fitted = PositionStatistics()
        shift = round(setting[1] * min(train_maps.shape[-2:]))
        fitted.fit((shifted_copies(batch, shift) for batch in train_maps.split(16)), shrink=setting[0])
        statistics[name] = fitted
    return statistics


@torch.no_grad()
def variant_scores(model, maps: torch.Tensor, statistics: dict) -> dict[str, torch.Tensor]:
    scorer = model.model.scorer
    scores = {}
    for name, fitted in statistics.items():
        standardised = maps if fitted is None else fitted.standardise(maps)
        scores[name] = scorer._resample.blur(standardised, scorer.score_blur_sigma).flatten(1).amax(dim=1)
    return scores


@torch.no_grad()
def margin_scores(model, maps: torch.Tensor) -> dict[str, torch.Tensor]:
    """The plain maximum of the smoothed score map without a border of each ``MARGINS`` share."""
    scorer = model.model.scorer
    smoothed = scorer._resample.blur(maps, scorer.score_blur_sigma)
    scores = {}
    for name, share in MARGINS.items():
        margin = max(1, round(share * min(maps.shape[-2:])))
        scores[name] = smoothed[..., margin:-margin, margin:-margin].flatten(1).amax(dim=1)
    return scores


class RandomReflectShift(v2.Transform):
    """Training augmentation: shift the frame (image and mask) by up to ``max_shift`` px along each axis, the uncovered
    border reflected (the ``shift±8`` drift, drawn at random)."""

    def __init__(self, max_shift: int) -> None:
        super().__init__()
        self.max_shift = int(max_shift)

    def make_params(self, flat_inputs: list) -> dict:
        del flat_inputs
        dy, dx = torch.randint(-self.max_shift, self.max_shift + 1, (2,)).tolist()
        return {"dy": dy, "dx": dx}

    def transform(self, inpt: torch.Tensor, params: dict) -> torch.Tensor:
        shifted = reflect_shift(inpt.as_subclass(torch.Tensor), params["dy"], params["dx"])
        return tv_tensors.wrap(shifted, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else shifted

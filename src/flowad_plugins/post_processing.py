"""Post-processing for the flow models: anomalib's ``PostProcessor`` with false-alarm-rate thresholds.

**Thresholds.** ``FlowPostProcessor(image_fpr=0.01, pixel_fpr=0.001)`` sets the image and pixel thresholds from the
*normal* validation images (``gt_label == 0``, held out from training) so that about that share of new normal
images (pixels) is flagged. anomalib's F1-adaptive threshold needs anomalous validation images; with only normal
ones it can only fall back to an extreme of the normal scores. The rule, per level:

- rate given: the threshold is the ``k``-th largest of the ``n`` normal validation scores, ``k = ⌊fpr·(n+1)⌋``
  (for pixels: of all their pixels). By exchangeability a new normal score exceeds it with probability
  ``k/(n+1) ≤ fpr``; the realised rate varies with the validation sample as ``Beta(k, n+1−k)``.
- rate ``None`` and validation holds anomalies: anomalib's F1-optimal threshold (its default, unchanged).
- rate ``None`` and validation holds only normal images: the rate defaults to ``DEFAULT_IMAGE_FPR`` /
  ``DEFAULT_PIXEL_FPR`` (5 % / 0.1 %); with too few images for it, the highest normal score is used, with a warning.
- When anomalies exist, the F1-optimal thresholds are always computed and reported alongside, never used by a
  given rate.

**Minimum counts.** An image rate ``fpr`` needs ``n ≥ ⌈1/fpr⌉ − 1`` normal validation images (so ``k ≥ 1``),
e.g. 19 for 5 %, 99 for 1 %. Pixels of one image are strongly correlated, so the pixel threshold counts images
too: it needs ``MIN_NORMAL_IMAGES_FOR_PIXEL_FPR`` (10) normal images, and its image-level standard error (the
spread of the per-image flagged fraction) is reported, with a warning above 50 % of the rate. Too few images
for a requested rate raise ``ValueError`` naming the count needed, at fit start when the datamodule shows it.

**Normalisation.** anomalib normalises a score as ``clamp((x − t)/(max − min) + 0.5, 0, 1)`` with ``t``, ``min``
and ``max`` from the validation set. Every test score beyond the validation range becomes exactly 0 or 1, so
ties corrupt AUROC/AUPRO computed after post-processing. ``FlowPostProcessor`` keeps the threshold at 0.5 and
the slope near it, but compresses the tails smoothly (``0.5 + 0.5·v/(1+|v|)``, ``v = 2(x − t)/(max − min)``):
strictly increasing, in (0, 1), no ties in float32 short of ~10⁷ ranges away.

**Persistence.** Raw thresholds are anomalib's buffers (checkpoint, and constants of the exported graph);
the rates and the threshold report (counts, ranks, expected rates, F1 thresholds) are plain data in the
checkpoint (``checkpoint_config``). ``write_threshold_metadata`` stamps the same report into an exported ONNX
or OpenVINO file.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.post_processing import PostProcessor
from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics import Metric

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_FPR = 0.05
DEFAULT_PIXEL_FPR = 0.001
MIN_NORMAL_IMAGES_FOR_PIXEL_FPR = 10
PIXEL_RELATIVE_ERROR_WARNING = 0.5
METADATA_KEY = "flowad_thresholds"


def required_normal_images(fpr: float) -> int:
    """Fewest normal images ``n`` whose order statistics can realise an image false-alarm rate ``fpr``.

    The ``k``-th largest of ``n`` normal scores is exceeded by a new normal score with probability
    ``k/(n+1)``; ``k = ⌊fpr·(n+1)⌋ ≥ 1`` needs ``n ≥ ⌈1/fpr⌉ − 1``.
    """
    return max(1, math.ceil(1.0 / fpr - 1.0 - 1e-9))


def false_alarm_threshold(normal_scores: torch.Tensor, fpr: float, allow_fewer: bool = False) -> tuple[float, int]:
    """Threshold flagging about ``fpr`` of new normal scores: the ``k``-th largest of ``normal_scores``.

    Args:
        normal_scores: scores of normal samples, any shape (flattened), ``n`` values.
        fpr: wanted false-alarm rate in (0, 1).
        allow_fewer: with ``⌊fpr·(n+1)⌋ < 1`` use the largest score (rate ``1/(n+1)``) instead of raising.

    Returns:
        (raw threshold, rank ``k``); flag ``score > threshold``. Expected rate ``k/(n+1) ≤ fpr``.
    """
    values = normal_scores.detach().flatten().float()
    count = values.numel()
    rank = math.floor(fpr * (count + 1) + 1e-9)
    if rank < 1:
        if not allow_fewer:
            msg = (
                f"A false-alarm rate of {fpr} needs at least {required_normal_images(fpr)} normal samples; got {count}."
            )
            raise ValueError(msg)
        rank = 1
    if count == 0:
        msg = "No normal samples to set a false-alarm threshold from."
        raise ValueError(msg)
    threshold = torch.kthvalue(values.cpu(), count - rank + 1).values
    return float(threshold), rank


def _check_rate(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < float(value) < 1.0:
        msg = f"{name} must be a false-alarm rate in (0, 1), e.g. 0.01, or None; got {value!r}."
        raise ValueError(msg)
    return float(value)


class _NormalValidationPredictions(Metric):
    """Scores ``(n,)`` and flattened maps ``(n, H·W)`` of the normal validation images; count of anomalous ones.

    A torchmetrics ``Metric`` so that ``compute`` gathers the states across DDP ranks.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("maps", default=[], dist_reduce_fx="cat")
        self.add_state("anomalous", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, batch: Batch) -> None:  # type: ignore[override]
        """Keep the normal images of ``batch`` (``gt_label == 0``); all are normal when labels are missing."""
        labels = batch.gt_label
        score = batch.pred_score
        anomaly_map = batch.anomaly_map
        if score is None and anomaly_map is not None:
            score = anomaly_map.flatten(1).amax(dim=1)
        if score is None:
            return
        normal = torch.ones(len(score), dtype=torch.bool, device=score.device)
        if labels is not None:
            normal = labels.flatten().to(score.device) == 0
            self.anomalous += int((~normal).sum())
        self.scores.append(score.detach().flatten()[normal].float())
        if anomaly_map is not None:
            self.maps.append(anomaly_map.detach()[normal].flatten(1).float())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(normal scores ``(n,)``, normal maps ``(n, P)`` or ``None``, number of anomalous images)."""
        scores = torch.cat(self.scores) if isinstance(self.scores, list) else self.scores
        if isinstance(scores, list):  # no update yet
            scores = torch.empty(0)
        maps = self.maps
        if isinstance(maps, list):
            maps = torch.cat(maps) if maps else None
        return scores, maps, int(self.anomalous)


class FlowPostProcessor(PostProcessor):
    """anomalib ``PostProcessor`` with thresholds at chosen false-alarm rates and rank-preserving normalisation.

    Args:
        image_fpr: share of normal images to flag, in (0, 1); ``None``: F1-optimal when validation holds
            anomalies, else ``DEFAULT_IMAGE_FPR``.
        pixel_fpr: share of normal pixels to flag, in (0, 1); ``None``: as ``image_fpr`` with ``DEFAULT_PIXEL_FPR``.
        verbose: print the threshold summary at the end of training.
        **kwargs: anomalib ``PostProcessor`` arguments (``enable_normalization``, sensitivities, ...).

    Example:
        ``CflowAD(post_processor=FlowPostProcessor(image_fpr=0.01, pixel_fpr=0.001))``, or on the CLI
        ``--model.post_processor flowad_plugins.post_processing.FlowPostProcessor``
        ``--model.post_processor.image_fpr 0.01``.
    """

    def __init__(
        self,
        image_fpr: float | None = None,
        pixel_fpr: float | None = None,
        verbose: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.image_fpr = _check_rate("image_fpr", image_fpr)
        self.pixel_fpr = _check_rate("pixel_fpr", pixel_fpr)
        self.verbose = verbose
        self.threshold_report: dict[str, Any] = {}
        self._normal_predictions = _NormalValidationPredictions()

    @property
    def _checkpoint_config_keys(self) -> tuple[str, ...]:
        """anomalib's keys plus the requested rates and the threshold report (plain data)."""
        return (*super()._checkpoint_config_keys, "image_fpr", "pixel_fpr", "threshold_report")

    # ---------------------------------------------------------------- Lightning hooks

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fail before training when validation is too small for a requested rate or overlaps the training set."""
        del pl_module
        if not self.enable_thresholding:
            return
        datamodule = getattr(trainer, "datamodule", None)
        val_paths, val_normal = _normal_sample_paths(getattr(datamodule, "val_data", None))
        if val_paths is None:
            return
        train_paths, _ = _normal_sample_paths(getattr(datamodule, "train_data", None))
        shared = set(val_normal) & set(train_paths or [])
        if shared:
            msg = (
                f"{len(shared)} normal validation images are also training images (e.g. {sorted(shared)[0]}); "
                "thresholds set on images the model was fitted on flag too little. Hold them out: "
                "val_split_mode='from_train' or 'synthetic' with val_split_ratio > 0."
            )
            raise ValueError(msg)
        self._check_counts(len(val_normal))

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Commit the flow's pending normal-data statistics before validation scores anything.

        Lightning validates *before* ``on_train_epoch_end``, where ``FlowAnomalibModule`` commits the epoch's
        likelihood statistics; without this, thresholds would be set on the previous epoch's scoring and
        shift when the statistics change. ``commit`` is a no-op when nothing is pending (validate-only runs,
        and the later end-of-epoch commit).
        """
        del trainer
        statistics = getattr(getattr(getattr(pl_module, "model", None), "scorer", None), "statistics", None)
        if statistics is not None and callable(getattr(statistics, "commit", None)):
            statistics.commit()

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Batch, *args: Any, **kwargs: Any
    ) -> None:
        """Accumulate anomalib's statistics and the normal images' scores and maps."""
        super().on_validation_batch_end(trainer, pl_module, outputs, *args, **kwargs)
        if self.enable_thresholding:
            self._normal_predictions.update(outputs)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Set normalisation statistics and thresholds (skipped during Lightning's sanity check)."""
        del pl_module
        if trainer.sanity_checking:
            self._reset_accumulators()
            return
        self._compute_normalization()
        if self.enable_thresholding and self._normal_predictions.update_called:
            self._compute_thresholds()
        self._reset_accumulators()

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Print the rates, raw thresholds and counts used."""
        del trainer, pl_module
        if self.verbose and self.threshold_report:
            print(self.summary())

    # ---------------------------------------------------------------- thresholds

    def _check_counts(self, normal_images: int) -> None:
        """Raise when ``normal_images`` cannot support a requested rate (message says how many are needed)."""
        problems = []
        if self.image_fpr is not None and normal_images < required_normal_images(self.image_fpr):
            problems.append(f"image_fpr={self.image_fpr} needs ≥ {required_normal_images(self.image_fpr)}")
        if self.pixel_fpr is not None and normal_images < MIN_NORMAL_IMAGES_FOR_PIXEL_FPR:
            problems.append(f"pixel_fpr={self.pixel_fpr} needs ≥ {MIN_NORMAL_IMAGES_FOR_PIXEL_FPR}")
        if problems:
            msg = (
                f"Too few normal validation images for the requested false-alarm rate: {normal_images} held-out "
                f"normal images, but {' and '.join(problems)} (an image rate r needs ⌈1/r⌉ − 1; pixels of one "
                "image are correlated, so pixel thresholds count images too). Raise val_split_ratio, add normal "
                "images, or request a larger rate."
            )
            raise ValueError(msg)

    def _compute_normalization(self) -> None:
        if not self.enable_normalization:
            return
        for metric, low, high in (
            (self._image_min_max_metric, self.image_min, self.image_max),
            (self._pixel_min_max_metric, self.pixel_min, self.pixel_max),
        ):
            if metric.update_called:
                value_min, value_max = metric.compute()
                low.copy_(value_min)
                high.copy_(value_max)

    def _compute_thresholds(self) -> None:
        normal_scores, normal_maps, anomalous = self._normal_predictions.compute()
        normal_images = int(normal_scores.numel())
        self._check_counts(normal_images)
        f1_image = self._f1_threshold(self._image_threshold_metric) if anomalous else None
        f1_pixel = self._f1_threshold(self._pixel_threshold_metric) if anomalous else None
        report: dict[str, Any] = {"normal_images": normal_images, "anomalous_images": anomalous}
        report["image"] = self._level_threshold(
            "image", normal_scores, self.image_fpr, DEFAULT_IMAGE_FPR, f1_image, normal_images
        )
        if normal_maps is not None:
            report["pixel"] = self._level_threshold(
                "pixel", normal_maps, self.pixel_fpr, DEFAULT_PIXEL_FPR, f1_pixel, normal_images
            )
        for level, buffer in (("image", self._image_threshold), ("pixel", self._pixel_threshold)):
            if level in report and report[level]["raw_threshold"] is not None:
                buffer.fill_(report[level]["raw_threshold"])
        self.threshold_report = report

    @staticmethod
    def _f1_threshold(metric: Metric) -> float | None:
        if not metric.update_called:
            return None
        value = float(metric.compute())
        return value if math.isfinite(value) else None

    def _level_threshold(
        self,
        level: str,
        normal_values: torch.Tensor,
        requested: float | None,
        default: float,
        f1_threshold: float | None,
        normal_images: int,
    ) -> dict[str, Any]:
        """Report for one level: source, rate, raw threshold, rank, expected/validation rate and its error."""
        entry: dict[str, Any] = {"requested_fpr": requested, "f1_threshold": f1_threshold}
        if requested is None and f1_threshold is not None:
            entry.update(source="f1", fpr=None, raw_threshold=f1_threshold)
        elif normal_images == 0:
            entry.update(source="none", fpr=None, raw_threshold=None)
        else:
            rate = requested if requested is not None else default
            threshold, rank = false_alarm_threshold(normal_values, rate, allow_fewer=requested is None)
            samples = normal_values.numel()
            entry.update(source="fpr" if requested is not None else "fpr_default", fpr=rate, raw_threshold=threshold,
                         rank=rank, samples=samples, expected_fpr=rank / (samples + 1))
            if requested is None and rank / (samples + 1) > rate * (1 + 1e-9):
                logger.warning(
                    "%s threshold: only %d normal validation samples, too few for the default rate %s; using the "
                    "highest normal score (expected false-alarm rate %.3g). Set %s_fpr or add normal images.",
                    level, samples, rate, rank / (samples + 1), level,
                )
            if level == "image":
                entry["expected_fpr_sd"] = math.sqrt(rank * (samples + 1 - rank) / ((samples + 1) ** 2 * (samples + 2)))
            else:
                per_image = (normal_values > threshold).float().mean(dim=1)
                standard_error = float(per_image.std() / math.sqrt(len(per_image))) if len(per_image) > 1 else math.nan
                entry.update(validation_fpr=float(per_image.mean()), validation_fpr_se=standard_error)
                if not standard_error <= PIXEL_RELATIVE_ERROR_WARNING * rate:
                    logger.warning(
                        "pixel threshold: the false-alarm pixels concentrate in few of the %d normal validation "
                        "images (rate %.3g ± %.3g across images); the realised pixel rate is uncertain. Add normal "
                        "images or raise pixel_fpr.", normal_images, float(per_image.mean()), standard_error,
                    )
        return entry

    def _reset_accumulators(self) -> None:
        for metric in (
            self._image_threshold_metric,
            self._pixel_threshold_metric,
            self._image_min_max_metric,
            self._pixel_min_max_metric,
            self._normal_predictions,
        ):
            metric.reset()

    # ---------------------------------------------------------------- reporting

    def summary(self) -> str:
        """A few lines: rates, raw thresholds, number of normal images, F1-optimal thresholds alongside."""
        report = self.threshold_report
        if not report:
            return "FlowPostProcessor: no thresholds set yet (no validation run)."
        lines = [
            f"FlowPostProcessor thresholds from {report['normal_images']} held-out normal validation images"
            + (f" ({report['anomalous_images']} anomalous images also seen):" if report["anomalous_images"] else
               " (no anomalous ones):")
        ]
        for level in ("image", "pixel"):
            entry = report.get(level)
            if entry is None:
                continue
            if entry["source"] == "f1":
                line = f"  {level}: F1-optimal raw threshold {entry['raw_threshold']:.6g} (no {level}_fpr given)"
            elif entry["source"] == "none":
                line = f"  {level}: no threshold (no normal validation images)"
            else:
                how = "requested" if entry["source"] == "fpr" else "default, validation has no anomalies"
                line = (f"  {level}: false-alarm rate {entry['fpr']:.3%} ({how}) -> raw threshold "
                        f"{entry['raw_threshold']:.6g}")
                if level == "image":
                    line += (f" ({_ordinal(entry['rank'])} highest of {entry['samples']} normal scores; expected rate "
                             f"{entry['expected_fpr']:.2%} ± {entry['expected_fpr_sd']:.2%})")
                else:
                    line += (f" (validation pixel rate {entry['validation_fpr']:.3%} ± "
                             f"{entry['validation_fpr_se']:.3%} across images)")
            if entry["source"] != "f1" and entry["f1_threshold"] is not None:
                line += f"; F1-optimal {entry['f1_threshold']:.6g} (not used)"
            lines.append(line)
        return "\n".join(lines)

    def threshold_metadata(self) -> dict[str, Any]:
        """Plain data describing the thresholds: requested rates, raw thresholds, and the full report."""
        return {
            "image_fpr": self.image_fpr,
            "pixel_fpr": self.pixel_fpr,
            "image_threshold": _finite_or_none(self.image_threshold),
            "pixel_threshold": _finite_or_none(self.pixel_threshold),
            "report": self.threshold_report,
        }

    # ---------------------------------------------------------------- normalisation

    @staticmethod
    def _normalize(
        preds: torch.Tensor | None,
        norm_min: torch.Tensor,
        norm_max: torch.Tensor,
        threshold: torch.Tensor,
    ) -> torch.Tensor | None:
        """Map ``preds`` to (0, 1), ``threshold`` to 0.5, strictly increasing; unchanged without statistics."""
        if preds is None:
            return preds
        threshold = torch.where(torch.isnan(threshold), (norm_max + norm_min) / 2, threshold)
        value_range = norm_max - norm_min
        safe_range = torch.where(value_range > 0, value_range, torch.ones_like(value_range))
        scaled = 2 * (preds - threshold) / safe_range
        normalized = 0.5 + 0.5 * scaled / (1 + scaled.abs())
        has_range = ~torch.isnan(norm_min) & ~torch.isnan(norm_max)
        return torch.where(has_range, normalized, preds)


def write_threshold_metadata(export_path: str | Path, post_processor: FlowPostProcessor) -> Path:
    """Stamp ``post_processor.threshold_metadata()`` (JSON) into an exported ``.onnx`` or OpenVINO ``.xml`` file.

    ONNX: ``metadata_props[METADATA_KEY]``; OpenVINO: ``model.get_rt_info(METADATA_KEY)``. The thresholds
    themselves are already constants of the exported graph; this records the rates and counts behind them.
    """
    path = Path(export_path)
    payload = json.dumps(post_processor.threshold_metadata())
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        kept = [prop for prop in model.metadata_props if prop.key != METADATA_KEY]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
        model.metadata_props.add(key=METADATA_KEY, value=payload)
        onnx.save(model, str(path))
    elif path.suffix == ".xml":
        import openvino as ov

        model = ov.Core().read_model(str(path))
        model.set_rt_info(payload, [METADATA_KEY])
        with tempfile.TemporaryDirectory() as folder:
            staged = Path(folder) / path.name
            ov.save_model(model, str(staged), compress_to_fp16=False)  # weights stay as exported
            del model
            shutil.move(staged, path)
            shutil.move(staged.with_suffix(".bin"), path.with_suffix(".bin"))
    else:
        msg = f"export_path must end in .onnx or .xml (OpenVINO IR); got {path.name!r}."
        raise ValueError(msg)
    return path


def read_threshold_metadata(export_path: str | Path) -> dict[str, Any]:
    """The metadata written by ``write_threshold_metadata`` (``.onnx`` or OpenVINO ``.xml``)."""
    path = Path(export_path)
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        values = {prop.key: prop.value for prop in model.metadata_props}
        if METADATA_KEY not in values:
            msg = f"{path} has no {METADATA_KEY!r} metadata; call write_threshold_metadata after export."
            raise KeyError(msg)
        return json.loads(values[METADATA_KEY])
    if path.suffix == ".xml":
        import openvino as ov

        model = ov.Core().read_model(str(path))
        if not model.has_rt_info([METADATA_KEY]):
            msg = f"{path} has no {METADATA_KEY!r} metadata; call write_threshold_metadata after export."
            raise KeyError(msg)
        return json.loads(model.get_rt_info([METADATA_KEY]).astype(str))
    msg = f"export_path must end in .onnx or .xml (OpenVINO IR); got {path.name!r}."
    raise ValueError(msg)


def _normal_sample_paths(dataset: Any) -> tuple[list[str] | None, list[str]]:
    """(all image paths, normal image paths) of an anomalib dataset, or ``(None, [])`` when unknown."""
    samples = getattr(dataset, "samples", None)
    if samples is None or "image_path" not in getattr(samples, "columns", ()):
        return None, []
    paths = [str(path) for path in samples["image_path"]]
    if "label_index" in samples.columns:
        normal = [str(path) for path, label in zip(samples["image_path"], samples["label_index"], strict=True)
                  if int(label) == 0]
    else:
        normal = paths
    return paths, normal


def _finite_or_none(value: torch.Tensor) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def _ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"

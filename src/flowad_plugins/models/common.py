"""What the three flow models share on the Lightning side.

``FlowAnomalibModule`` holds the behaviour every flow model needs beyond anomalib's base class:
the train-statistics life cycle of the scorer (reset at epoch start, commit at epoch end, summed over
DDP ranks), checks of the training data and input size with clear errors, the non-finite-loss guard,
random-number states in checkpoints (a resumed run continues exactly where it stopped), and an evaluator
that also reports AUPRO. Subclasses set ``self.model`` (with ``.encoder`` and ``.scorer``) and write
``configure_optimizers``/``training_step``.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Score
from anomalib.models.components import AnomalibModule
from lightning.pytorch.utilities.types import STEP_OUTPUT

from flowad_plugins.post_processing import FlowPostProcessor

logger = logging.getLogger(__name__)

MIN_TRAIN_IMAGES = 4


RNG_STATES_KEY = "flowad_rng_states"


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


def distributed_world_size() -> int:
    """Number of processes of the initialised default process group (1 without ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_max(value: int, device: torch.device) -> int:
    """Largest ``value`` over all DDP ranks (``value`` itself in a single process)."""
    if distributed_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def collect_rng_states() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (initialised) CUDA generator states, as tensors and plain Python values
    (so ``torch.load(..., weights_only=True)`` still loads the checkpoint)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {"python": random.getstate(),
                              "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                                        float(cached_gaussian)),
                              "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of ``collect_rng_states`` (CUDA states only when this machine has as many GPUs)."""
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class FlowAnomalibModule(AnomalibModule):
    """Base of ``CflowAD``, ``FastFlow`` and ``CSFlow`` (one-class, trained on normal images)."""

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """anomalib's default test metrics plus pixel AUPRO (FPR limit 0.3); ranking metrics on validation.

        Validation metrics (prefix ``val_``) are what model and hyper-parameter choices may look at;
        with a validation split from normal training images (+ synthetic anomalies) they never touch
        the test set.
        """
        val_metrics = [
            AUROC(fields=["pred_score", "gt_label"], prefix="val_image_", strict=False),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="val_pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="val_pixel_", strict=False),
        ]
        test_metrics = [
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        ]
        return Evaluator(val_metrics=val_metrics, test_metrics=test_metrics)

    def configure_post_processor(self) -> FlowPostProcessor:
        """anomalib's thresholds with rank-preserving normalisation (see ``post_processing``)."""
        return FlowPostProcessor()

    def _compress_ov_model(self, model: Any, compression_type: Any = None, *args: Any, **kwargs: Any) -> Any:
        """``CompressionType.INT8``: flow-head weights only (``export.compress_flow_weights``); else anomalib's."""
        from anomalib.deploy import CompressionType

        if compression_type == CompressionType.INT8:
            from flowad_plugins.export import compress_flow_weights

            return compress_flow_weights(self, model)
        return super()._compress_ov_model(model, compression_type, *args, **kwargs)

    def _post_training_quantization_ov(self, model: Any, datamodule: Any = None) -> Any:
        """OpenVINO INT8_PTQ of the backbone, calibrated on normal training images only (``flowad_plugins.export``)."""
        from flowad_plugins.export import quantize_backbone_on_normal_images

        logger.warning(
            "%s: INT8_PTQ (backbone activations in INT8) lowered image/pixel AUROC on MVTec bottle by 0.01 to 0.6 "
            "(benchmarks/results/export_parity.md); compression_type=INT8 (flow-head weights) or FP16 kept it within "
            "0.005. Check the quantized model on your own validation images before deploying it.",
            type(self).__name__,
        )
        return quantize_backbone_on_normal_images(self, model, datamodule)

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained on normal images only."""
        return LearningType.ONE_CLASS

    def on_fit_start(self) -> None:
        """Fail early, with the parameter named, on an input size the backbone layers cannot use."""
        if self.input_size is not None:
            self.model.encoder.check_input_size(tuple(self.input_size))

    def on_train_start(self) -> None:
        """Refuse training sets too small to fit a flow and its normal-data statistics."""
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        count = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
        if count is not None and count < MIN_TRAIN_IMAGES:
            msg = (
                f"Too few training images: got {count}, need at least {MIN_TRAIN_IMAGES} normal images to fit "
                "the flow and its normal-data statistics (check the datamodule's root/category and split)."
            )
            raise ValueError(msg)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the random-number states, so a run resumed from this end-of-epoch checkpoint shuffles images
        (and CflowAD's fibers) as the uninterrupted run would have."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[RNG_STATES_KEY] = collect_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """When resuming a fit, restore the saved random-number states right away.

        Lightning loads the checkpoint after the data set-up and creates the resumed epoch's data iterator (which
        draws its shuffling seed) before ``on_train_epoch_start``, so this is the last point before that draw.
        ``load_from_checkpoint`` (no trainer) leaves the global generators alone.
        """
        super().on_load_checkpoint(checkpoint)
        states = checkpoint.get(RNG_STATES_KEY)
        if states is not None and self._trainer is not None and self._trainer.state.fn == "fit":
            restore_rng_states(states)

    def on_train_epoch_start(self) -> None:
        """Start a fresh accumulation of normal-data likelihood statistics."""
        self.model.scorer.statistics.reset()

    def on_train_epoch_end(self) -> None:
        """Store this epoch's normal-data likelihood statistics (gathered across DDP ranks)."""
        self.model.scorer.statistics.commit()

    def check_finite_loss(self, loss: torch.Tensor, images: torch.Tensor | None = None) -> None:
        """Stop training with a clear message, naming the likely cause, when ``loss`` is NaN or infinite.

        Call it before ``backward``: the weights (and every checkpoint written so far) stay as they were.
        ``images`` (``B×3×H×W``, the batch) lets the message tell bad data from a diverging optimisation.
        """
        finite = torch.isfinite(loss.detach()).to(torch.int32).reshape(1)
        if distributed_world_size() > 1:  # every rank stops together, none waits in the next all-reduce
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if bool(finite):
            return
        loss_text = "non-finite on another DDP rank" if bool(torch.isfinite(loss)) else str(loss.item())
        precision = str(self._trainer.precision) if self._trainer is not None else "32"
        if images is not None and not bool(torch.isfinite(images).all()):
            bad = int((~torch.isfinite(images)).flatten(1).any(dim=1).sum())
            cause = (f"Likely cause: the input batch holds non-finite pixel values ({bad} of {len(images)} images): "
                     "check the dataset files and the pre-processing transforms")
        elif precision.startswith("16"):
            cause = (f"Likely cause: a float16 overflow under precision={precision!r}: use precision='bf16-mixed' "
                     f"or '32', or lower lr (lr={getattr(self, 'lr', '?')})")
        else:
            cause = (f"Likely causes: learning rate too high for this data (lr={getattr(self, 'lr', '?')}), or a "
                     "coupling clamp too loose: lower lr (or the clamp)")
        msg = (
            f"{self.name}: training loss became {loss_text} at epoch {self.current_epoch}, step "
            f"{self.global_step}. {cause}. Training stopped before this step's update, so the "
            "weights and every checkpoint written before it are intact; fix the cause, then resume with "
            "Engine.fit(..., ckpt_path=<last checkpoint>)."
        )
        raise NonFiniteLossError(msg)

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Predict scores and maps for the validation batch (used by the post-processor's thresholds)."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

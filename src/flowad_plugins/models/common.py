"""``FlowAnomalibModule``: what the three flow models share on the Lightning side.

A subclass sets ``self.model`` (a torch model with ``.encoder`` and ``.scorer``) and then calls ``adopt_input_size``;
it implements ``training_losses(batch)`` (one ``FlowLoss`` per optimizer step) and ``configure_optimizers``, and may
override ``trainer_arguments``, ``check_input_size`` and ``build_for_input_size`` (FastFlow's layer norms).
The base class owns the rest: training steps (finite-loss check, normal-data statistics, manual optimization), the
input size (checked, kept in the hyper-parameters, rebuilt from a checkpoint), random-number states in checkpoints
(a resumed run continues exactly), checks of the training data, the evaluator and the post-processor.
"""

from __future__ import annotations

import logging
import math
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
import torch.distributed as dist
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Score
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.utilities.types import STEP_OUTPUT

from flowad_plugins.checkpoints import MODEL_CLASS_KEY, check_checkpoint_matches
from flowad_plugins.input_guard import check_channels, validated_input_size
from flowad_plugins.models.evaluation import FlowEvaluator
from flowad_plugins.models.openvino_compression import FlowOpenVINOCompression
from flowad_plugins.models.training_state import (  # re-exported for the models
    all_reduce_max,
    collect_rng_states,
    distributed_world_size,
    restore_rng_states,
)
from flowad_plugins.post_processing import FlowPostProcessor
from flowad_plugins.scoring import LikelihoodStatistics, NormalStatisticsLifeCycle

logger = logging.getLogger(__name__)

__all__ = ["FlowAnomalibModule", "FlowLoss", "NonFiniteLossError", "all_reduce_max", "distributed_world_size"]

MIN_TRAIN_IMAGES = 4
RNG_STATES_KEY = "flowad_rng_states"


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


class FlowLoss(NamedTuple):
    """One optimizer step of a flow model: ``loss`` (the scalar to minimise) and ``log_likelihoods[l]``, the
    log-likelihoods per dimension (any shape) of the normal data at scale ``l`` this step saw (for the scorer's
    statistics; ``None`` where a scale saw nothing new)."""

    loss: torch.Tensor
    log_likelihoods: Sequence[torch.Tensor | None]


def check_optimiser_settings(lr: float, **non_negative: float) -> None:
    """``ValueError`` naming the parameter unless ``lr`` is a positive finite number and every other setting
    (weight decay, gradient clipping) a finite number ≥ 0 (a string such as ``"4e-3"`` from a Python call included)."""
    for name, value in {"lr": lr, **non_negative}.items():
        is_number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not (is_number and (value > 0 if name == "lr" else value >= 0)):
            msg = f"{name} must be a {'positive' if name == 'lr' else '≥ 0'} number, got {value!r}."
            raise ValueError(msg)


class FlowAnomalibModule(FlowOpenVINOCompression, AnomalibModule):
    """Base of ``CflowAD``, ``FastFlow`` and ``CSFlow`` (one-class, trained on normal images); see the module.

    Common arguments of the three models:
        pre_trained: ImageNet weights (offline package or timm download; no silent random fallback).
        backbone_weights: local backbone weights file (takes precedence over ``pre_trained``).
        input_size: ``(H, W)`` the default pre-processor resizes to; ``None`` = a custom pre-processor's size, else
            ``DEFAULT_INPUT_SIZE``.
        pre_processor, post_processor, evaluator, visualizer: anomalib components (``True`` = default).
        seed: seed Python, NumPy and torch before the model is built (``--model.seed`` on the CLI, which ignores
            ``--seed_everything``), so the same run twice gives the same model; ``None`` leaves the random state alone.
    """

    # input size of the default pre-processor when neither ``input_size`` nor a pre-processor is given
    DEFAULT_INPUT_SIZE: ClassVar[tuple[int, int]] = (256, 256)

    def __init__(
        self,
        input_size: Sequence[int] | None = None,
        seed: int | None = None,
        pre_processor: PreProcessor | bool = True,
        **components: Any,
    ) -> None:
        """See the class; ``components``: anomalib's post-processor, evaluator and visualizer."""
        if seed is not None:
            seed_everything(seed, workers=True)
        size = None if input_size is None else validated_input_size(input_size)
        default_pre_processor = pre_processor is True
        if default_pre_processor and size is not None:
            pre_processor = self.configure_pre_processor(size)
        super().__init__(pre_processor=pre_processor, **components)
        self._default_pre_processor = default_pre_processor

    # --- what a subclass provides ----------------------------------------------------------------------------

    @abstractmethod
    def training_losses(self, batch: Batch) -> Iterator[FlowLoss]:
        """Yield one ``FlowLoss`` per optimizer step on ``batch`` (exactly one under automatic optimization); with
        manual optimization the optimizer steps after each, so each loss sees the previous step's weights."""

    def check_input_size(self, input_size: tuple[int, int]) -> None:
        """Raise ``ValueError`` naming ``input_size`` when the model cannot use it (default: the encoder's check)."""
        self.model.encoder.check_input_size(input_size)

    def build_for_input_size(self, input_size: tuple[int, int]) -> None:
        """Rebuild the parts whose shapes depend on the input size (default: none do)."""
        del input_size

    # --- input size ------------------------------------------------------------------------------------------

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """anomalib's resize + ImageNet normalisation, at ``image_size`` or ``DEFAULT_INPUT_SIZE``."""
        return AnomalibModule.configure_pre_processor(tuple(image_size or cls.DEFAULT_INPUT_SIZE))

    def adopt_input_size(self, input_size: Sequence[int] | None) -> None:
        """Make ``input_size`` the model's: checked, the default pre-processor resized to it, its shape-dependent
        parts built for it and the size kept in the hyper-parameters (so checkpoints rebuild it). ``None``: the
        model takes any size it accepts (no pre-processor resize)."""
        if input_size is None:
            return
        size = validated_input_size(input_size)
        self.check_input_size(size)
        if self._default_pre_processor and self.input_size is not None and tuple(self.input_size) != size:
            self.pre_processor = self.configure_pre_processor(size)
        self.build_for_input_size(size)
        self.hparams["input_size"] = list(size)

    def setup(self, stage: str) -> None:
        """Follow a pre-processor replaced after construction (fail early, with the size named, if unusable)."""
        super().setup(stage)
        self.adopt_input_size(self.input_size)

    # --- anomalib components ---------------------------------------------------------------------------------

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """anomalib's default test metrics plus pixel AUPRO (FPR limit 0.3); ranking metrics on validation
        (prefix ``val_``, what model choices may look at; pixel-level ones at a fit's last validation only)."""
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
        return FlowEvaluator(val_metrics=val_metrics, test_metrics=test_metrics)

    def configure_post_processor(self) -> FlowPostProcessor:
        """anomalib's thresholds with rank-preserving normalisation (see ``post_processing``)."""
        return FlowPostProcessor()

    def configure_callbacks(self) -> list[Callback]:
        """anomalib's component callbacks plus the normal-data statistics life cycle."""
        return [*super().configure_callbacks(), NormalStatisticsLifeCycle()]

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No gradient clipping by Lightning; no sanity validation (the scorer has no statistics before training)."""
        return {"gradient_clip_val": 0, "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained on normal images only."""
        return LearningType.ONE_CLASS

    @property
    def likelihood_statistics(self) -> LikelihoodStatistics:
        """The scorer's normal-data statistics (buffers of ``self.model``, saved with it)."""
        return self.model.scorer.statistics

    # --- training --------------------------------------------------------------------------------------------

    def on_train_end(self) -> None:
        """Free the training images' cached backbone features (``backbones.feature_cache``)."""
        self.model.encoder.cache.clear()

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

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Every step of ``training_losses``: finite-loss check, statistics update, and with manual optimization
        backward + optimizer step (the LR schedulers step once per batch). Logs the mean loss as ``train_loss``."""
        del args, kwargs
        manual = not self.automatic_optimization
        optimizer = self.optimizers() if manual else None
        total, steps = torch.zeros((), device=batch.image.device), 0
        with self.model.encoder.cache.active():  # frozen backbone: each training image's features once per fit
            for step in self.training_losses(batch):
                if steps and not manual:
                    msg = f"{self.name}.training_losses yielded several losses under automatic optimization."
                    raise RuntimeError(msg)
                self.check_finite_loss(step.loss, batch.image)
                self.likelihood_statistics.update_all([None if v is None else v.detach()
                                                       for v in step.log_likelihoods])
                if optimizer is not None:
                    optimizer.zero_grad(set_to_none=True)
                    self.manual_backward(step.loss)
                    optimizer.step()
                total, steps, last_loss = total + step.loss.detach(), steps + 1, step.loss
        if not steps:
            msg = f"{self.name}.training_losses yielded no loss for a batch of {len(batch.image)} images."
            raise RuntimeError(msg)
        schedulers = self.lr_schedulers() if manual else None
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            scheduler.step()
        mean_loss = total / steps
        self.log("train_loss", mean_loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch.image))
        return {"loss": mean_loss if manual else last_loss}

    def check_finite_loss(self, loss: torch.Tensor, images: torch.Tensor | None = None) -> None:
        """Stop training with a message naming the likely cause when ``loss`` is NaN or infinite. Called before
        ``backward``, so the weights stay intact; ``images`` (``B×3×H×W``) tells bad data from a divergence."""
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

    def forward(self, batch: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """anomalib's pipeline, after a clear error for a channel count it cannot take (``input_guard``)."""
        check_channels(batch)
        return super().forward(batch, *args, **kwargs)

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Predict scores and maps for the validation batch (used by the post-processor's thresholds)."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    # --- checkpoints -----------------------------------------------------------------------------------------

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """anomalib's, after a check of the file: empty or foreign files get a clear ``CheckpointFileError``."""
        from flowad_plugins.checkpoints import check_lightning_checkpoint

        check_lightning_checkpoint(checkpoint_path, model_class=cls.__name__)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the random-number states, so a run resumed from this end-of-epoch checkpoint shuffles images
        (and CflowAD's fibers) as the uninterrupted run would have."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[RNG_STATES_KEY] = collect_rng_states()
        checkpoint[MODEL_CLASS_KEY] = type(self).__name__

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild for the checkpoint's input size (its pre-processor's, else its ``input_size`` hyper-parameter)
        before its state dict loads; when resuming a fit, restore the saved random-number states.

        This is the last point before the resumed epoch's data iterator draws its shuffling seed (Lightning
        creates it before ``on_train_epoch_start``). ``load_from_checkpoint`` (no trainer) leaves them alone.
        """
        super().on_load_checkpoint(checkpoint)
        stored = checkpoint.get("hyper_parameters", {}).get("input_size")
        self.adopt_input_size(self.input_size if self.input_size is not None else stored)
        check_checkpoint_matches(self, checkpoint)  # a clear error instead of Lightning's size-mismatch list
        states = checkpoint.get(RNG_STATES_KEY)
        if states is not None and self._trainer is not None and self._trainer.state.fn == "fit":
            restore_rng_states(states)

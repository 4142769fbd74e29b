"""The contract every flow model fulfils through the API, checked on all three (tiny configs from
``conftest.TINY_CONFIGS``).

Fit, validate, test, predict; batch independence; checkpoint round trip; a checkpoint restores its input size into
a model built with other arguments; a non-finite loss raises ``NonFiniteLossError`` before any update; export to
every type anomalib offers: TORCH (reloads and predicts the same), ONNX and OPENVINO (match torch). The same
contract through the ``anomalib`` CLI: ``test_contract_cli.py``.

One model per class is fitted per module (1 epoch, ``INPUT_SIZE`` px, not the default of any of them).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from anomalib.deploy import ExportType
from conftest import MODEL_NAMES, tiny_engine, tiny_model
from contract_fixtures import (
    EXPECTED_METRICS,
    INPUT_SIZE,
    assert_ir_output,
    assert_same,
    outputs,
)
from lightning.pytorch import seed_everything

import flowad_plugins
from flowad_plugins.models.common import FlowLoss, NonFiniteLossError

# --- API -------------------------------------------------------------------------------------------------------


def test_fit_validate_test_predict(fitted, images: torch.Tensor) -> None:
    model, engine, datamodule = fitted.model, fitted.engine, fitted.datamodule
    assert bool(model.likelihood_statistics.fitted)
    assert tuple(model.input_size) == INPUT_SIZE and model.hparams["input_size"] == list(INPUT_SIZE)
    validation = engine.validate(model=model, datamodule=datamodule, verbose=False)[0]
    assert {"val_image_AUROC", "val_pixel_AUROC"} <= set(validation)
    metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    assert set(metrics) >= EXPECTED_METRICS and all(0.0 <= value <= 1.0 for value in metrics.values())
    predictions = engine.predict(model=model, datamodule=datamodule, return_predictions=True)
    assert sum(len(batch.pred_score) for batch in predictions) == len(datamodule.test_data)
    batch = predictions[0]
    assert batch.anomaly_map.shape[-2:] == batch.image.shape[-2:] and batch.pred_label is not None
    assert bool(torch.isfinite(batch.anomaly_map).all())


def test_an_image_scores_the_same_alone_and_in_a_batch(fitted, images: torch.Tensor) -> None:
    together, alone = outputs(fitted.model, images), outputs(fitted.model, images[2:3])
    assert (together.anomaly_map[2] - alone.anomaly_map[0]).abs().max().item() <= 1e-5
    assert abs(together.pred_score[2].item() - alone.pred_score[0].item()) <= 1e-5


def test_checkpoint_round_trip_predicts_identically(fitted, images: torch.Tensor) -> None:
    model_class = getattr(flowad_plugins, fitted.name)
    restored = model_class.load_from_checkpoint(fitted.checkpoint, weights_only=True)
    assert tuple(restored.input_size) == INPUT_SIZE
    assert_same(outputs(restored, images), outputs(fitted.model, images), atol=1e-6)
    torch.testing.assert_close(restored.likelihood_statistics.std, fitted.model.likelihood_statistics.std)


def test_checkpoint_restores_its_input_size_into_a_model_built_at_the_default(fitted, images: torch.Tensor) -> None:
    """What ``anomalib test --ckpt_path`` does: build the model from arguments, then load the checkpoint."""
    seed_everything(1)
    other = tiny_model(fitted.name, input_size=None)  # the class default, not INPUT_SIZE
    assert tuple(other.input_size) != INPUT_SIZE
    metrics = fitted.engine.test(model=other, datamodule=fitted.datamodule, ckpt_path=fitted.checkpoint,
                                 verbose=False)[0]
    assert set(metrics) >= EXPECTED_METRICS
    assert tuple(other.input_size) == INPUT_SIZE and other.hparams["input_size"] == list(INPUT_SIZE)
    assert_same(outputs(other, images), outputs(fitted.model, images), atol=1e-6)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_non_finite_loss_raises_before_any_update(name: str, tiny_datamodule, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    seed_everything(0)
    model = tiny_model(name, INPUT_SIZE)
    before = {k: v.clone() for k, v in model.model.state_dict().items() if v.is_floating_point()}
    losses = model.training_losses

    def poisoned(batch):
        for step in losses(batch):
            yield FlowLoss(step.loss * float("nan"), step.log_likelihoods)

    monkeypatch.setattr(model, "training_losses", poisoned)
    with pytest.raises(NonFiniteLossError, match=f"{name}: training loss became nan at epoch 0, step 0"):
        tiny_engine(tmp_path).fit(model=model, datamodule=tiny_datamodule)
    after = model.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k]) and "input_norm" not in k]
    assert not changed, f"weights changed before the error: {changed[:5]}"


# --- export (API) ----------------------------------------------------------------------------------------------


def test_torch_export_reloads_and_predicts_the_same(fitted, images: torch.Tensor,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from anomalib.deploy import TorchInferencer

    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # anomalib's opt-in to unpickle the exported (whole) model
    path = fitted.engine.export(fitted.model, ExportType.TORCH, export_root=fitted.workdir / "torch")
    prediction = TorchInferencer(path, device="cpu").predict(images)
    assert_same(prediction, outputs(fitted.model, images))


def test_onnx_export_matches_torch(fitted, images: torch.Tensor) -> None:
    import onnxruntime as ort

    path = fitted.engine.export(fitted.model, ExportType.ONNX, export_root=fitted.workdir / "onnx",
                                input_size=INPUT_SIZE)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    resized = torch.nn.functional.interpolate(images, size=INPUT_SIZE, mode="bilinear", antialias=True)
    named = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": resized.numpy()}),
                     strict=True))
    expected = outputs(fitted.model, resized)
    assert_same(SimpleNamespace(**named), expected, atol=1e-4)


def test_openvino_export_matches_torch(fitted, images: torch.Tensor, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``Engine.export`` to an uncompressed IR: OpenVINO at float32 gives torch's scores and maps."""
    path = fitted.engine.export(fitted.model, ExportType.OPENVINO, export_root=tmp_path, input_size=INPUT_SIZE)
    assert_ir_output(path, fitted.model, images, tmp_path, monkeypatch, compressed=False)

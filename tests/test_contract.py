"""The contract every flow model fulfils, checked on all three (tiny configs from ``conftest.TINY_CONFIGS``).

API: fit, validate, test, predict; batch independence; checkpoint round trip; a checkpoint restores its input
size into a model built with other arguments; a non-finite loss raises ``NonFiniteLossError`` before any update;
export to every type anomalib offers: TORCH (reloads and predicts the same), ONNX and OPENVINO (match torch).
CLI (``anomalib export`` of the fitted checkpoint, in this process): TORCH, and OPENVINO with each compression
(FP16, INT8, INT8_PTQ calibrated on normal images, INT8_ACQ checked on validation); in subprocesses: ``anomalib
train`` at a non-default input size, then ``test``/``predict``/``export --ckpt_path`` with ``--model.*`` arguments
that do not name it.

One model per class is fitted per module (1 epoch, ``INPUT_SIZE`` px, not the default of any of them).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from anomalib.deploy import ExportType
from conftest import (
    MODEL_NAMES,
    SYNTHETIC_CLI_DATA,
    run_anomalib,
    synthetic_datamodule,
    tiny_cli_args,
    tiny_engine,
    tiny_model,
)
from lightning.pytorch import seed_everything

import flowad_plugins
from flowad_plugins.models.common import FlowLoss, NonFiniteLossError

INPUT_SIZE = (96, 96)  # defaults: 256 (CflowAD, FastFlow), 640 (CSFlow)
EXPECTED_METRICS = {"image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_AUPRO"}


def _outputs(model, images: torch.Tensor) -> SimpleNamespace:
    """Post-processed ``pred_score`` and ``anomaly_map`` of the Lightning model (eval mode)."""
    model.eval()
    with torch.no_grad():
        result = model(images)
    return SimpleNamespace(pred_score=result.pred_score, anomaly_map=result.anomaly_map)


def _assert_same(actual, expected, atol: float = 1e-5) -> None:
    torch.testing.assert_close(torch.as_tensor(np.asarray(actual.anomaly_map)).reshape(expected.anomaly_map.shape),
                               expected.anomaly_map, atol=atol, rtol=0)
    torch.testing.assert_close(torch.as_tensor(np.asarray(actual.pred_score)).reshape(expected.pred_score.shape),
                               expected.pred_score, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def images(synthetic_root: Path) -> torch.Tensor:
    """Five generated test images ``5×3×128×128`` in [0, 1] (normal and defective)."""
    datamodule = synthetic_datamodule(synthetic_root)
    datamodule.setup("test")
    indices = np.linspace(0, len(datamodule.test_data) - 1, 5).astype(int)
    return torch.stack([datamodule.test_data[int(i)].image for i in indices])


@pytest.fixture(scope="module", params=MODEL_NAMES)
def fitted(request: pytest.FixtureRequest, synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """(name, model, engine, datamodule, checkpoint, workdir): each tiny model fitted for 1 epoch by the API."""
    name = request.param
    workdir = tmp_path_factory.mktemp(name)
    seed_everything(0)
    model = tiny_model(name, INPUT_SIZE)
    engine, datamodule = tiny_engine(workdir), synthetic_datamodule(synthetic_root)
    engine.fit(model=model, datamodule=datamodule)
    checkpoint = workdir / "model.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    return SimpleNamespace(name=name, model=model, engine=engine, datamodule=datamodule, checkpoint=checkpoint,
                           workdir=workdir)


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
    together, alone = _outputs(fitted.model, images), _outputs(fitted.model, images[2:3])
    assert (together.anomaly_map[2] - alone.anomaly_map[0]).abs().max().item() <= 1e-5
    assert abs(together.pred_score[2].item() - alone.pred_score[0].item()) <= 1e-5


def test_checkpoint_round_trip_predicts_identically(fitted, images: torch.Tensor) -> None:
    model_class = getattr(flowad_plugins, fitted.name)
    restored = model_class.load_from_checkpoint(fitted.checkpoint, weights_only=True)
    assert tuple(restored.input_size) == INPUT_SIZE
    _assert_same(_outputs(restored, images), _outputs(fitted.model, images), atol=1e-6)
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
    _assert_same(_outputs(other, images), _outputs(fitted.model, images), atol=1e-6)


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
    _assert_same(prediction, _outputs(fitted.model, images))


def test_onnx_export_matches_torch(fitted, images: torch.Tensor) -> None:
    import onnxruntime as ort

    path = fitted.engine.export(fitted.model, ExportType.ONNX, export_root=fitted.workdir / "onnx",
                                input_size=INPUT_SIZE)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    resized = torch.nn.functional.interpolate(images, size=INPUT_SIZE, mode="bilinear", antialias=True)
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": resized.numpy()}),
                       strict=True))
    expected = _outputs(fitted.model, resized)
    _assert_same(SimpleNamespace(**outputs), expected, atol=1e-4)


def test_openvino_export_matches_torch(fitted, images: torch.Tensor, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``Engine.export`` to an uncompressed IR: OpenVINO at float32 gives torch's scores and maps."""
    path = fitted.engine.export(fitted.model, ExportType.OPENVINO, export_root=tmp_path, input_size=INPUT_SIZE)
    _assert_ir_output(path, fitted.model, images, tmp_path, monkeypatch, compressed=False)


# INT8 (flow-head weights) and INT8_PTQ (backbone scope) depend on each model's graph: every model; FP16 and INT8_ACQ
# (the INT8_PTQ scope plus nncf's accuracy control) add no model-specific step: one model each
COMPRESSION_CASES = [*((name, compression) for compression in ("INT8", "INT8_PTQ") for name in MODEL_NAMES),
                     ("CflowAD", "FP16"), ("CSFlow", "INT8_ACQ")]


@pytest.mark.parametrize(("fitted", "compression"), COMPRESSION_CASES, indirect=["fitted"])
def test_cli_openvino_export_with_each_compression(fitted, images: torch.Tensor, compression: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``anomalib export --export_type openvino --compression_type X --ckpt_path …`` (the CLI calls
    ``Engine.export``; INT8_PTQ / INT8_ACQ get ``--data``): the IR runs and keeps the map's pattern."""
    needs_data = compression in {"INT8_PTQ", "INT8_ACQ"}
    data_args = [*SYNTHETIC_CLI_DATA, "--data.root", str(fitted.datamodule.root)] if needs_data else []
    run_cli_in_process(["export", *tiny_cli_args(fitted.name), "--ckpt_path", str(fitted.checkpoint),
                        "--export_type", "openvino", "--compression_type", compression,
                        "--input_size", str(list(INPUT_SIZE)), *data_args, "--default_root_dir", str(tmp_path)])
    path = next(tmp_path.rglob("model.xml"))
    _assert_ir_output(path, fitted.model, images, tmp_path, monkeypatch, compressed=True)


def test_cli_torch_export_reloads(fitted, images: torch.Tensor, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from anomalib.deploy import TorchInferencer

    run_cli_in_process(["export", *tiny_cli_args(fitted.name), "--ckpt_path", str(fitted.checkpoint),
                        "--export_type", "torch", "--default_root_dir", str(tmp_path)])
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")
    prediction = TorchInferencer(next(tmp_path.rglob("model.pt")), device="cpu").predict(images)
    _assert_same(prediction, _outputs(fitted.model, images))


def run_cli_in_process(args: list[str]) -> None:
    """``anomalib <args>`` run by ``AnomalibCLI`` in this process (no interpreter start-up per call)."""
    from anomalib.cli import AnomalibCLI

    AnomalibCLI(args)


def _assert_ir_output(path: Path, model, images: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      compressed: bool) -> None:
    """The IR's prediction of ``images`` resized to ``INPUT_SIZE`` (f32 hint) against torch's: equal within 1e-3
    (``compressed=False``), or finite maps correlating > 0.9 with torch's."""
    from anomalib.deploy import OpenVINOInferencer

    from flowad_plugins.export import openvino_config

    assert path.is_file() and path.with_suffix(".bin").is_file()
    resized = torch.nn.functional.interpolate(images, size=INPUT_SIZE, mode="bilinear", antialias=True)
    monkeypatch.chdir(tmp_path)
    prediction = OpenVINOInferencer(path, device="CPU", config=openvino_config("f32")).predict(resized)
    expected = _outputs(model, resized)
    maps = np.asarray(prediction.anomaly_map).reshape(expected.anomaly_map.shape)
    assert np.isfinite(maps).all()
    if not compressed:
        _assert_same(prediction, expected, atol=1e-3)
    else:
        correlation = np.corrcoef(maps.ravel(), expected.anomaly_map.numpy().ravel())[0, 1]
        assert correlation > 0.9, f"{path}: the map correlates {correlation:.3f} with torch's"


# --- CLI -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_checkpoint(fitted, synthetic_root: Path) -> Path:
    """``anomalib train`` of the tiny model at ``INPUT_SIZE`` (1 epoch); the checkpoint it wrote."""
    workdir = fitted.workdir / "cli"
    workdir.mkdir()
    output = run_anomalib(["train", *tiny_cli_args(fitted.name), "--model.input_size", str(list(INPUT_SIZE)),
                           *SYNTHETIC_CLI_DATA, "--data.root", str(synthetic_root), "--trainer.max_epochs", "1",
                           "--trainer.enable_progress_bar", "false", "--default_root_dir", str(workdir)], workdir)
    assert "image_AUROC" in output and "pixel_AUPRO" in output
    checkpoints = sorted(workdir.rglob("*.ckpt"))
    assert checkpoints, "anomalib train wrote no checkpoint"
    return checkpoints[-1]


def test_cli_test_predict_and_export_restore_the_trained_input_size(fitted, cli_checkpoint: Path,
                                                                    synthetic_root: Path, tmp_path: Path,
                                                                    capfd: pytest.CaptureFixture[str]) -> None:
    """``--model.*`` arguments without the input size build the default size; the checkpoint's size wins.

    The checkpoint comes from the ``anomalib`` console command (``cli_checkpoint``); test, predict and export run
    the same CLI class in this process (no interpreter start-up each)."""
    model_args = [*tiny_cli_args(fitted.name), "--ckpt_path", str(cli_checkpoint)]
    data_args = [*SYNTHETIC_CLI_DATA, "--data.root", str(synthetic_root)]
    run_cli_in_process(["test", *model_args, *data_args, "--default_root_dir", str(tmp_path / "test")])
    output = "".join(capfd.readouterr())
    assert "image_AUROC" in output and "size mismatch" not in output
    folder = next(p for p in (synthetic_root / "surface" / "test").iterdir() if p.name != "good")
    run_cli_in_process(["predict", *model_args, "--data", str(folder), "--default_root_dir", str(tmp_path / "predict")])
    assert len(list((tmp_path / "predict").rglob("*.png"))) == len(list(folder.iterdir()))
    run_cli_in_process(["export", *model_args, "--export_type", "onnx", "--default_root_dir", str(tmp_path / "export")])
    import onnx

    graph = onnx.load(str(next((tmp_path / "export").rglob("model.onnx"))), load_external_data=False).graph
    assert [dim.dim_value for dim in graph.input[0].type.tensor_type.shape.dim][:2] == [0, 3]  # B dynamic, RGB

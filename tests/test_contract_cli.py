"""The contract through the ``anomalib`` CLI, checked on all three models (tiny configs).

``anomalib export`` of the fitted checkpoint (in this process): TORCH, and OPENVINO with each compression offered
(FP16, INT8 flow-head weights; anomalib's INT8_PTQ is refused with the allowed values); ``anomalib train`` (the console
command) at a non-default input size, then ``test``/``predict``/``export --ckpt_path`` with ``--model.*``
arguments that do not name it. A module of its own so the suite's two workers share the contract's work.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import MODEL_NAMES, SYNTHETIC_CLI_DATA, run_anomalib, tiny_cli_args
from contract_fixtures import (
    INPUT_SIZE,
    assert_ir_output,
    assert_same,
    outputs,
    run_cli_in_process,
)

# INT8 (flow-head weights) depends on each model's graph: every model; FP16 adds no model-specific step
COMPRESSION_CASES = [*((name, "INT8") for name in MODEL_NAMES), ("CflowAD", "FP16")]


@pytest.mark.parametrize(("fitted", "compression"), COMPRESSION_CASES, indirect=["fitted"])
def test_cli_openvino_export_with_each_compression(fitted, images: torch.Tensor, compression: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``anomalib export --export_type openvino --compression_type X --ckpt_path …`` (the CLI calls
    ``Engine.export``): the IR runs and keeps the map's pattern."""
    run_cli_in_process(["export", *tiny_cli_args(fitted.name), "--ckpt_path", str(fitted.checkpoint),
                        "--export_type", "openvino", "--compression_type", compression,
                        "--input_size", str(list(INPUT_SIZE)), "--default_root_dir", str(tmp_path)])
    path = next(tmp_path.rglob("model.xml"))
    assert_ir_output(path, fitted.model, images, tmp_path, monkeypatch, compressed=True)


@pytest.mark.parametrize("fitted", ["CflowAD"], indirect=True)
def test_cli_openvino_export_refuses_backbone_quantization(fitted, tmp_path: Path) -> None:
    """``anomalib export --compression_type INT8_PTQ`` (anomalib's enum has it): a clear error naming the allowed
    values, before any file is written."""
    with pytest.raises(ValueError, match=r"compression_type='int8_ptq'.*allowed values: \[None, 'fp16', 'int8'\]"):
        run_cli_in_process(["export", *tiny_cli_args(fitted.name), "--ckpt_path", str(fitted.checkpoint),
                            "--export_type", "openvino", "--compression_type", "INT8_PTQ",
                            "--input_size", str(list(INPUT_SIZE)), "--default_root_dir", str(tmp_path)])
    assert not list(tmp_path.rglob("*.xml"))


def test_cli_torch_export_reloads(fitted, images: torch.Tensor, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from anomalib.deploy import TorchInferencer

    run_cli_in_process(["export", *tiny_cli_args(fitted.name), "--ckpt_path", str(fitted.checkpoint),
                        "--export_type", "torch", "--default_root_dir", str(tmp_path)])
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")
    prediction = TorchInferencer(next(tmp_path.rglob("model.pt")), device="cpu").predict(images)
    assert_same(prediction, outputs(fitted.model, images))


# --- train, then test / predict / export a checkpoint -----------------------------------------------------------------


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

"""What the contract tests share: the tiny models fitted once per test module, test images and checks of outputs.

A pytest plugin (``conftest.pytest_plugins``): the module-scoped fixtures ``fitted`` and ``images`` are set up once
in each module that uses them; modules with a ``fitted`` of their own keep theirs.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import MODEL_NAMES, synthetic_datamodule, tiny_engine, tiny_model
from lightning.pytorch import seed_everything

INPUT_SIZE = (96, 96)  # defaults: 256 (CflowAD, FastFlow), 640 (CSFlow)
EXPECTED_METRICS = {"image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_AUPRO"}


def outputs(model, images: torch.Tensor) -> SimpleNamespace:
    """Post-processed ``pred_score`` and ``anomaly_map`` of the Lightning model (eval mode)."""
    model.eval()
    with torch.no_grad():
        result = model(images)
    return SimpleNamespace(pred_score=result.pred_score, anomaly_map=result.anomaly_map)


def assert_same(actual, expected, atol: float = 1e-5) -> None:
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


def run_cli_in_process(args: list[str]) -> None:
    """``anomalib <args>`` run by ``AnomalibCLI`` in this process (no interpreter start-up per call)."""
    from anomalib.cli import AnomalibCLI

    AnomalibCLI(args)


def assert_ir_output(path: Path, model, images: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      compressed: bool) -> None:
    """The IR's prediction of ``images`` resized to ``INPUT_SIZE`` (f32 hint) against torch's: equal within 1e-3
    (``compressed=False``), or finite maps correlating > 0.9 with torch's."""
    from anomalib.deploy import OpenVINOInferencer

    from flowad_plugins.export import openvino_config

    assert path.is_file() and path.with_suffix(".bin").is_file()
    resized = torch.nn.functional.interpolate(images, size=INPUT_SIZE, mode="bilinear", antialias=True)
    monkeypatch.chdir(tmp_path)
    prediction = OpenVINOInferencer(path, device="CPU", config=openvino_config("f32")).predict(resized)
    expected = outputs(model, resized)
    maps = np.asarray(prediction.anomaly_map).reshape(expected.anomaly_map.shape)
    assert np.isfinite(maps).all()
    if not compressed:
        assert_same(prediction, expected, atol=1e-3)
    else:
        correlation = np.corrcoef(maps.ravel(), expected.anomaly_map.numpy().ravel())[0, 1]
        assert correlation > 0.9, f"{path}: the map correlates {correlation:.3f} with torch's"

"""Frames with NaN or infinite pixels are never reported as normal: torch, ONNX and OpenVINO give the same outcome."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flowad_plugins import CflowAD, CSFlow, FastFlow
from flowad_plugins.input_guard import finite_frames

SIZE = 64
MODELS = {
    "CflowAD": lambda: CflowAD(backbone="efficientnet_lite0", layers=["blocks.2"], coupling_blocks=2, condition_dim=8,
                               permute_soft=False),
    "FastFlow": lambda: FastFlow(backbone="efficientnet_lite0", layers=["blocks.2"], flow_steps=2,
                                 input_size=(SIZE, SIZE)),
    "CSFlow": lambda: CSFlow(pre_processor=CSFlow.configure_pre_processor((SIZE, SIZE)), backbone="efficientnet_lite0",
                             layer="blocks.2", coupling_blocks=1, hidden_channels=8),
}


def _broken_batch() -> torch.Tensor:
    torch.manual_seed(0)
    images = torch.rand(4, 3, SIZE, SIZE)
    images[1, 0, 5, 7] = float("nan")
    images[2, 2, 0, 0] = float("inf")
    images[3, 1, 9, 9] = -float("inf")
    return images


@pytest.fixture(scope="module", params=list(MODELS))
def fitted_model(request: pytest.FixtureRequest):
    """An untrained model with fitted-looking statistics and thresholds (eval mode, full anomalib pipeline)."""
    torch.manual_seed(0)
    model = MODELS[request.param]().eval()
    model.model.scorer.statistics.fitted.fill_(True)
    with torch.no_grad():
        scores = model.model(torch.rand(6, 3, SIZE, SIZE)).pred_score
    post = model.post_processor
    high, low = float(scores.max()), float(scores.min())  # finite test frames may fall on either side
    for buffer, value in [(post._image_threshold, high), (post._pixel_threshold, high), (post.image_min, low),
                          (post.image_max, high + 1.0), (post.pixel_min, low), (post.pixel_max, high + 1.0)]:
        buffer.fill_(value)
    return request.param, model


def test_finite_frames_flags_each_image() -> None:
    assert finite_frames(_broken_batch()).tolist() == [True, False, False, False]


def test_non_finite_frames_score_inf_and_label_anomalous_in_torch(fitted_model, caplog) -> None:
    _, model = fitted_model
    images = _broken_batch()
    with torch.no_grad():
        output = model(images)
        alone = model(images[:1])
    assert output.pred_label[1:].all() and output.pred_mask[1:].all()
    assert (output.pred_score[1:] == 1.0).all()  # normalised: the top of the scale
    with torch.no_grad():
        raw = model.model(images)
    assert torch.isinf(raw.pred_score[1:]).all() and torch.isinf(raw.anomaly_map[1:]).all()
    assert "3 of 4 images hold NaN or infinite pixel values" in caplog.text
    # the healthy frame is scored as if alone: nothing non-finite leaked into it
    torch.testing.assert_close(output.pred_score[:1], alone.pred_score, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.anomaly_map[:1], alone.anomaly_map, atol=1e-5, rtol=1e-5)


def test_non_finite_frames_are_anomalous_in_onnx_and_openvino(fitted_model, tmp_path: Path) -> None:
    import onnxruntime
    import openvino as ov

    _, model = fitted_model
    images = _broken_batch()
    with torch.no_grad():
        reference = model(images)
    onnx_path = model.to_onnx(tmp_path, input_size=(SIZE, SIZE))
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    onnx_outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()}), strict=True))
    compiled = ov.Core().compile_model(str(onnx_path), "CPU")  # the CPU's default precision, no configuration
    ov_results = compiled(images.numpy())
    ov_outputs = {output.get_any_name(): ov_results[output] for output in compiled.outputs}
    for outputs in (onnx_outputs, ov_outputs):
        assert np.asarray(outputs["pred_label"]).reshape(-1).tolist() == reference.pred_label.tolist()
        assert (np.asarray(outputs["pred_score"]).reshape(-1)[1:] == 1.0).all()
        assert np.asarray(outputs["pred_mask"])[1:].all()

"""Frames with NaN or infinite pixels, or in the 0–255 range, are never reported as normal: torch, ONNX and OpenVINO
give the same outcome."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flowad_plugins import CflowAD, CSFlow, FastFlow
from flowad_plugins.input_guard import finite_frames, plausible_frames

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
    images = torch.rand(5, 3, SIZE, SIZE)
    images[4] *= 255  # an 8-bit frame not divided by 255
    images[1, 0, 5, 7] = float("nan")
    images[2, 2, 0, 0] = float("inf")
    images[3, 1, 9, 9] = -float("inf")
    return images


@pytest.fixture(scope="module", params=list(MODELS))
def fitted_model(request: pytest.FixtureRequest):
    """An untrained model with statistics fitted on six images and thresholds set from their scores (eval mode, full
    anomalib pipeline). NumPy is seeded too: the flows' channel permutations draw from it."""
    np.random.seed(0)
    torch.manual_seed(0)
    model = MODELS[request.param]().eval()
    normals = torch.rand(6, 3, SIZE, SIZE)
    with torch.no_grad():
        model.model.scorer.statistics.update_all(model.model.likelihood_maps(normals))
        model.model.scorer.statistics.commit()
        scores = model.model(normals).pred_score
    post = model.post_processor
    high, low = float(scores.max()), float(scores.min())  # finite test frames may fall on either side
    for buffer, value in [(post._image_threshold, high), (post._pixel_threshold, high), (post.image_min, low),
                          (post.image_max, high + 1.0), (post.pixel_min, low), (post.pixel_max, high + 1.0)]:
        buffer.fill_(value)
    return request.param, model


def test_finite_and_plausible_frames_flag_each_image() -> None:
    assert finite_frames(_broken_batch()).tolist() == [True, False, False, False, True]
    normalised = (_broken_batch() - 0.45) / 0.226  # what the pre-processor hands the torch model
    assert plausible_frames(normalised).tolist() == [True, False, False, False, False]
    edges = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])  # black and white frames are plausible
    assert plausible_frames((edges - 0.485) / 0.229).all()


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
    assert "Of 5 images, 3 hold NaN or infinite pixel values and 1 have pixel values far outside [0, 1]" in caplog.text
    # the healthy frame is scored as if alone: nothing non-finite leaked into it
    torch.testing.assert_close(output.pred_score[:1], alone.pred_score, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.anomaly_map[:1], alone.anomaly_map, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def exported(fitted_model, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The model exported once to ONNX and once with its own ``to_openvino`` (fixed size, float32 marks)."""
    _, model = fitted_model
    root = tmp_path_factory.mktemp("export")
    onnx_path = Path(model.to_onnx(root, input_size=(SIZE, SIZE)))
    xml = Path(model.to_openvino(root / "openvino", input_size=(SIZE, SIZE)))
    return onnx_path, xml


def test_non_finite_frames_are_anomalous_in_onnx_and_openvino(fitted_model, exported) -> None:
    import onnxruntime
    import openvino as ov

    _, model = fitted_model
    onnx_path, xml = exported
    images = _broken_batch()
    with torch.no_grad():
        reference = model(images)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    onnx_outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()}), strict=True))
    compiled = ov.Core().compile_model(xml, "CPU")  # the CPU's default precision, no configuration
    ov_results = compiled(images.numpy())
    ov_outputs = {output.get_any_name(): ov_results[output] for output in compiled.outputs}
    for outputs in (onnx_outputs, ov_outputs):
        assert np.asarray(outputs["pred_label"]).reshape(-1).tolist() == reference.pred_label.tolist()
        assert (np.asarray(outputs["pred_score"]).reshape(-1)[1:] == 1.0).all()
        assert np.asarray(outputs["pred_mask"])[1:].all()


COMPILE_AT_DEFAULT = """
import json, sys
from pathlib import Path
import numpy as np
import openvino as ov
xml, folder = sys.argv[1], Path(sys.argv[2])
compiled = ov.Core().compile_model(xml, "CPU")  # no configuration at all: the CPU's default precision
runtime = {}
for node in compiled.get_runtime_model().get_ordered_ops():
    info = node.get_rt_info()
    for name in info["originalLayersNames"].astype(str).split(","):
        runtime[name] = info["runtimePrecision"].astype(str)
(folder / "runtime.json").write_text(json.dumps(runtime))
images = np.load(folder / "images.npy")
outputs = compiled(images)
np.savez(folder / "outputs.npz", **{port.get_any_name(): outputs[port] for port in compiled.outputs})
exact = ov.Core().compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
outputs = exact(images)
np.savez(folder / "outputs_f32.npz", **{port.get_any_name(): outputs[port] for port in exact.outputs})
"""


def test_openvino_export_is_static_keeps_backbone_and_tail_float32_and_matches_torch_at_default_precision(
    fitted_model, exported
) -> None:
    """A fixed-size export has static shapes; compiled with no configuration at all (bf16 on CPUs that have it) its
    marked layers (backbone, score tail) run in float32, the flow head's convolutions in the CPU's fast precision,
    and it scores as torch does."""
    import xml.etree.ElementTree as ElementTree

    import openvino as ov

    _, model = fitted_model
    _, xml = exported
    torch.manual_seed(1)
    images = torch.rand(4, 3, SIZE, SIZE)
    with torch.no_grad():
        reference = model(images)  # the whole pipeline (pre-processing, model, post-processing), as exported
    layers = list(ElementTree.parse(xml).getroot().iter("layer"))
    marked = {layer.get("name"): layer.get("type") for layer in layers
              if any(a.get("name") == "precise" for a in layer.iter("attribute"))}
    convolutions = {layer.get("name") for layer in layers if layer.get("type") == "Convolution"}
    assert "ReduceSum" in marked.values() and marked.keys() & convolutions  # tail and backbone marked
    assert convolutions - marked.keys()  # the flow head's convolutions are left to the CPU's precision
    ir = ov.Core().read_model(xml)
    assert [str(dim) for dim in ir.input(0).get_partial_shape()][1:] == ["3", str(SIZE), str(SIZE)]
    assert all(output.get_partial_shape()[1:].is_static for output in ir.outputs)
    del ir
    # compiled in a fresh process, as a deployment would: the result must not depend on what else this long-lived
    # test process compiled before
    np.save(xml.parent / "images.npy", images.numpy())
    result = subprocess.run([sys.executable, "-c", COMPILE_AT_DEFAULT, str(xml), str(xml.parent)], capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    runtime = json.loads((xml.parent / "runtime.json").read_text())
    by_name = dict(np.load(xml.parent / "outputs.npz"))
    marked_convolutions = [name for name in marked.keys() & convolutions if name in runtime]
    assert marked_convolutions and all(runtime[name] == "f32" for name in marked_convolutions)
    exact = dict(np.load(xml.parent / "outputs_f32.npz"))
    # with the f32 hint the IR is torch; at the default the untrained flow head runs in bf16, which moves an untrained
    # model's log-likelihoods (tens of nats below the mean) by up to 0.025 of this scale (trained models, whose
    # accuracy at the default is what matters: benchmarks/default_precision.py)
    np.testing.assert_allclose(exact["pred_score"].reshape(-1), reference.pred_score.numpy(), atol=1e-3)
    np.testing.assert_allclose(by_name["pred_score"].reshape(-1), reference.pred_score.numpy(), atol=5e-2)
    torch_map = reference.anomaly_map.numpy().reshape(4, -1)
    ir_map = by_name["anomaly_map"].reshape(4, -1).astype(np.float64)
    for index in range(4):  # per-image pixel ranking: Spearman correlation
        ranks = [np.argsort(np.argsort(values)) for values in (torch_map[index], ir_map[index])]
        assert np.corrcoef(*ranks)[0, 1] > 0.99

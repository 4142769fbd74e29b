"""Edge export: ONNX and OpenVINO IR of all three models (tiny configs), parity with torch, dynamic batch, errors.

One tiny model per class is fitted for 1 epoch on the generated 128-px data and exported once to ONNX
(anomalib's ``to_onnx`` through ``export_model``); the IR is OpenVINO's conversion of that file, which is what
``to_openvino`` does. CflowAD (the fastest to export) also goes through ``Engine.export`` with INT8, FP16 and
the ``anomalib export`` CLI.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.deploy import CompressionType, ExportType, OpenVINOInferencer
from anomalib.engine import Engine
from conftest import TINY_CFLOW, synthetic_datamodule
from lightning.pytorch import seed_everything

import flowad_plugins
from flowad_plugins.data import PredictFolder
from flowad_plugins.export import (
    export_model,
    openvino_config,
    static_input_size,
)

TINY = {
    "CflowAD": TINY_CFLOW,
    "FastFlow": {"backbone": "efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "flow_steps": 2,
                 "input_size": (128, 128)},
    "CSFlow": {"backbone": "efficientnet_lite0", "layer": "blocks.2", "coupling_blocks": 2, "hidden_channels": 16},
}
OUTPUTS = ("pred_score", "pred_label", "anomaly_map", "pred_mask")
MAP_TOLERANCE = 1e-3  # max |Δ map| relative to the torch map's range (FP32)


def _fit(name: str, root: Path, workdir: Path) -> tuple[flowad_plugins.CflowAD, Engine]:
    """Tiny ``name`` model fitted for 1 epoch (thresholds from the synthetic validation split)."""
    seed_everything(0)
    model = getattr(flowad_plugins, name)(**TINY[name])
    model.pre_processor = model.configure_pre_processor((128, 128))
    engine = Engine(max_epochs=1, accelerator="cpu", devices=1, logger=False, default_root_dir=workdir,
                    enable_progress_bar=False)
    engine.fit(model=model, datamodule=synthetic_datamodule(root))
    return model.eval(), engine


def _test_images(root: Path) -> torch.Tensor:
    """Six generated test images ``6×3×128×128`` (normal and defective) in [0, 1]."""
    datamodule = synthetic_datamodule(root)
    datamodule.setup("test")
    items = [datamodule.test_data[index] for index in np.linspace(0, len(datamodule.test_data) - 1, 6).astype(int)]
    return torch.stack([item.image for item in items])


def _check_parity(reference, outputs: dict[str, np.ndarray]) -> None:
    """Exported outputs match torch's: maps within MAP_TOLERANCE of the range, same labels away from 0.5."""
    assert set(OUTPUTS) <= set(outputs)
    expected = {name: getattr(reference, name).numpy() for name in OUTPUTS}
    for name in OUTPUTS:
        assert outputs[name].shape == expected[name].shape, name
    map_range = float(expected["anomaly_map"].max() - expected["anomaly_map"].min())
    assert map_range > 0
    assert np.abs(outputs["anomaly_map"] - expected["anomaly_map"]).max() <= MAP_TOLERANCE * map_range
    assert np.abs(outputs["pred_score"] - expected["pred_score"]).max() <= 1e-4
    decisive = np.abs(expected["pred_score"] - 0.5) > 1e-4  # a label exactly at the threshold may flip
    assert np.array_equal(outputs["pred_label"].astype(bool)[decisive], expected["pred_label"][decisive])


def _inferencer_outputs(prediction) -> dict[str, np.ndarray]:
    """``OpenVINOInferencer.predict`` outputs in the IR's layout (its ``NumpyImageBatch`` puts masks channel-last)."""
    outputs = {field: np.asarray(getattr(prediction, field)) for field in OUTPUTS}
    if outputs["pred_mask"].ndim == 4 and outputs["pred_mask"].shape[-1] == 1:
        outputs["pred_mask"] = np.moveaxis(outputs["pred_mask"], -1, 1)
    return outputs


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path):
    """``fitted(name) -> (model, engine)``: each tiny model is fitted once per module."""
    cache: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in cache:
            cache[name] = _fit(name, synthetic_root, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(scope="module", params=list(TINY))
def exported(request, fitted, synthetic_root: Path):
    """(name, model, engine, torch outputs, images, ONNX path, IR path) for each model class."""
    import openvino as ov

    name = request.param
    model, engine = fitted(name)
    workdir = Path(engine.trainer.default_root_dir)
    images = _test_images(synthetic_root)
    with torch.no_grad():
        reference = model(images)
    onnx_path = export_model(model, "onnx", workdir / "export")  # input_size None: any H×W, dynamic batch
    ir_path = onnx_path.parent.parent / "openvino" / "model.xml"
    ov.save_model(ov.convert_model(onnx_path), ir_path, compress_to_fp16=False)
    return name, model, engine, reference, images, onnx_path, ir_path


def test_onnx_runtime_matches_torch_with_the_output_contract(exported) -> None:
    ort = pytest.importorskip("onnxruntime", reason="optional: pip install 'flowad-plugins[bench]'")

    _, model, _, reference, images, onnx_path, _ = exported
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert session.get_inputs()[0].shape == ["batch_size", 3, "height", "width"]
    assert [o.name for o in session.get_outputs()] == list(OUTPUTS)
    assert reference.pred_score.shape == (6,) and reference.anomaly_map.shape == (6, 1, 128, 128)
    outputs = dict(zip(OUTPUTS, session.run(None, {"input": images.numpy()}), strict=True))
    _check_parity(reference, outputs)
    with torch.no_grad():  # exporting must leave the eager model (and CflowAD's condition cache) intact
        assert torch.allclose(model(images).anomaly_map, reference.anomaly_map, atol=1e-6)


def test_exported_graph_takes_any_batch_and_stays_batch_independent(exported) -> None:
    ort = pytest.importorskip("onnxruntime", reason="optional: pip install 'flowad-plugins[bench]'")

    _, _, _, _, images, onnx_path, _ = exported
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    together = session.run(None, {"input": images[:5].numpy()})
    for index in (0, 4):
        alone = session.run(None, {"input": images[index : index + 1].numpy()})
        for joint, single in zip(together, alone, strict=True):
            assert single.shape[0] == 1 and joint.shape[0] == 5
            assert np.allclose(joint[index : index + 1].astype(np.float32), single.astype(np.float32), atol=1e-5)
    larger = session.run(None, {"input": torch.nn.functional.interpolate(images[:2], size=(160, 160)).numpy()})
    assert larger[2].shape == (2, 1, 128, 128)  # the in-graph pre-processor resizes any input to 128


def test_openvino_inferencer_runs_the_ir_in_fp32(exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name, _, _, reference, images, _, ir_path = exported
    monkeypatch.chdir(tmp_path)  # OpenVINOInferencer writes ./openvino_cache
    inferencer = OpenVINOInferencer(ir_path, device="CPU", config=openvino_config("f32"))
    together = _inferencer_outputs(inferencer.predict(images))
    _check_parity(reference, together)
    alone = _inferencer_outputs(inferencer.predict(images[2:3]))  # dynamic batch, batch-independent results
    assert np.allclose(alone["anomaly_map"], together["anomaly_map"][2:3], atol=1e-5)
    assert static_input_size(inferencer.model) is None, name


def test_int8_compresses_the_flow_head_weights_and_keeps_the_backbone_float(
    fitted, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``CompressionType.INT8`` through ``Engine.export``: flow-head weights INT8, backbone convolutions float."""
    import openvino as ov

    from flowad_plugins.export.onnx_graph import backbone_layer_count

    model, engine = fitted("CflowAD")
    ir_path = engine.export(model, ExportType.OPENVINO, export_root=tmp_path / "int8w", input_size=(128, 128),
                            compression_type=CompressionType.INT8)
    ir = ov.Core().read_model(ir_path)

    def weight_type(op) -> str:  # element type of the constant behind the weight input (through Convert/Multiply)
        node = op.input_value(1).get_node()
        while node.get_type_name() != "Constant" and node.get_input_size():
            node = node.input_value(0).get_node()
        return node.get_output_element_type(0).get_type_name()

    convolutions = [weight_type(op) for op in ir.get_ops() if op.get_type_name() in ("Convolution", "GroupConvolution")]
    matmuls = [weight_type(op) for op in ir.get_ops() if op.get_type_name() == "MatMul"
               and op.input_value(1).get_node().get_type_name() != "Parameter"]
    # CflowAD's exported flow head runs as 1×1 convolutions (and MatMuls): INT8 weights; the backbone's stay float
    assert any(kind in {"u8", "i8"} for kind in convolutions + matmuls), (convolutions, matmuls)
    assert sum(kind == "f32" for kind in convolutions) >= backbone_layer_count(model, (128, 128)), convolutions
    images = _test_images(synthetic_root)
    with torch.no_grad():
        reference = model(images)
    monkeypatch.chdir(tmp_path)
    prediction = OpenVINOInferencer(ir_path, device="CPU", config=openvino_config("f32")).predict(images)
    correlation = np.corrcoef(np.asarray(prediction.anomaly_map).ravel(), reference.anomaly_map.numpy().ravel())
    assert correlation[0, 1] > 0.99


def _folder_with_unreadable_images(source: Path, target: Path) -> list[Path]:
    """Copy of ``source``'s images into ``target`` plus a truncated and an empty PNG; returns the readable ones."""
    target.mkdir(parents=True)
    readable = []
    for path in sorted(source.iterdir()):
        readable.append(target / path.name)
        shutil.copy(path, readable[-1])
    data = readable[0].read_bytes()
    (target / "truncated.png").write_bytes(data[: len(data) // 2])
    (target / "empty.png").write_bytes(b"")
    return readable


def test_fp16_ir_and_overlays_on_a_folder(fitted, synthetic_root: Path, tmp_path: Path) -> None:
    """FP16 IR (Engine.export) → the edge runtime's folder prediction writes one overlay PNG per readable image,
    scores as torch; a truncated and an empty PNG are skipped and listed."""
    from PIL import Image

    from flowad_plugins.edge import EdgeModel
    from flowad_plugins.edge.cli import predict_images

    model, engine = fitted("CflowAD")
    ir_path = engine.export(model, ExportType.OPENVINO, export_root=tmp_path / "fp16", input_size=(128, 128),
                            compression_type=CompressionType.FP16)
    assert static_input_size(__import__("openvino").Core().read_model(ir_path)) == (128, 128)
    source = next(p for p in (synthetic_root / "surface" / "test").iterdir() if p.name != "good")
    images = _folder_with_unreadable_images(source, tmp_path / "images")
    summary = predict_images(EdgeModel(ir_path, precision="f32"), [tmp_path / "images"], tmp_path / "out")
    records = summary["results"]
    assert [Path(r["path"]).name for r in records] == [p.name for p in images]
    assert sorted(Path(item["path"]).name for item in summary["skipped"]) == ["empty.png", "truncated.png"]
    for record in records:
        overlay = Image.open(record["overlay"])
        assert overlay.size == (128, 128) and overlay.mode == "RGB"
    assert sorted(p.name for p in (tmp_path / "out" / "overlays").iterdir()) == sorted(
        f"{p.stem}_overlay.png" for p in images)
    with torch.no_grad():
        from anomalib.data.utils import read_image

        reference = model(torch.stack([read_image(p, as_tensor=True) for p in images]))
    # FP16 weights: scores within 1 % of the normalised range (FP32 parity is tested above at 1e-4), same labels
    assert np.allclose([r["score"] for r in records], reference.pred_score.numpy(), atol=1e-2)
    assert [r["label"] for r in records] == reference.pred_label.tolist()


def test_predict_folder_dataset_skips_unreadable_files(synthetic_root: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    source = next(p for p in (synthetic_root / "surface" / "test").iterdir() if p.name != "good")
    images = _folder_with_unreadable_images(source, tmp_path / "images")
    dataset = PredictFolder(tmp_path / "images")
    assert len(dataset) == len(images) + 2
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=dataset.collate_fn)
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    paths = [Path(path).name for batch in batches for path in batch.image_path]
    assert paths == [p.name for p in images]
    assert batches[0].image.shape == (2, 3, 128, 128)
    assert [Path(item["path"]).name for item in dataset.skipped] == ["empty.png", "truncated.png"]
    assert "skipping" in caplog.text and "truncated.png" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"path='.*missing' does not exist"):
        PredictFolder(tmp_path / "missing")


def test_anomalib_predict_cli_with_predict_folder_skips_unreadable_files(
    fitted, synthetic_root: Path, tmp_path: Path
) -> None:
    """``anomalib predict --data flowad_plugins.data.PredictFolder``: every readable image predicted, the rest named."""
    _, engine = fitted("CflowAD")
    checkpoint = next(Path(engine.trainer.default_root_dir).rglob("*.ckpt"))
    source = next(p for p in (synthetic_root / "surface" / "test").iterdir() if p.name != "good")
    images = _folder_with_unreadable_images(source, tmp_path / "images")
    model_args = [item for key, value in TINY_CFLOW.items()  # the checkpoint restores into a model of the same shape
                  for item in (f"--model.{key}", f"[{', '.join(value)}]" if isinstance(value, list) else str(value))]
    command = [str(Path(sys.executable).with_name("anomalib")), "predict", "--model", "flowad_plugins.CflowAD",
               *model_args, "--ckpt_path", str(checkpoint), "--data", "flowad_plugins.data.PredictFolder",
               "--data.path", str(tmp_path / "images"), "--default_root_dir", str(tmp_path / "results"),
               "--trainer.enable_progress_bar", "false"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "skipped 2 of" in output and "truncated.png" in output and "empty.png" in output, output[-4000:]
    written = {p.name for p in (tmp_path / "results").rglob("*.png")}
    assert {p.name for p in images} <= written, written


def test_backbone_quantization_is_refused_before_any_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """anomalib's INT8_PTQ / INT8_ACQ (backbone activations in INT8) are not offered: a clear error naming the allowed
    values, from ``to_openvino`` (what ``Engine.export`` and ``anomalib export`` call) and ``export_model``."""
    model = flowad_plugins.CflowAD(**TINY_CFLOW)
    monkeypatch.setattr(model, "to_onnx", lambda *args, **kwargs: pytest.fail("export started"))
    allowed = r"allowed values: \[None, 'fp16', 'int8'\]"
    for compression in (CompressionType.INT8_PTQ, CompressionType.INT8_ACQ):
        with pytest.raises(ValueError, match=rf"compression_type='{compression.value}' is not supported.*{allowed}"):
            model.to_openvino(tmp_path, "model", (128, 128), compression)
        with pytest.raises(ValueError, match=allowed):
            export_model(model, "openvino", tmp_path, compression_type=compression.value)
    engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=allowed):
        engine.export(model, ExportType.OPENVINO, export_root=tmp_path, compression_type=CompressionType.INT8_PTQ)
    assert not list(tmp_path.rglob("*.xml"))


def test_int8_without_nncf_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from flowad_plugins.export import compress_flow_weights

    monkeypatch.setitem(sys.modules, "nncf", None)  # as if the optional package were not installed
    with pytest.raises(ImportError, match=r"needs the optional package 'nncf'.*pip install 'flowad-plugins\[int8\]'"):
        compress_flow_weights(flowad_plugins.CflowAD(**TINY_CFLOW), None)


def test_int8_export_without_nncf_is_refused_before_any_export_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``to_openvino`` (what ``Engine.export`` and ``anomalib export`` call) and ``export_model`` check for nncf first:
    nothing is traced, converted or written."""
    monkeypatch.setitem(sys.modules, "nncf", None)
    model = flowad_plugins.CflowAD(**TINY_CFLOW)
    monkeypatch.setattr(model, "to_onnx", lambda *args, **kwargs: pytest.fail("export started"))
    with pytest.raises(ImportError, match=r"compression_type='int8' needs the optional package 'nncf'"):
        model.to_openvino(tmp_path / "ir", compression_type=CompressionType.INT8)
    with pytest.raises(ImportError, match="flowad-plugins\\[int8\\]"):
        export_model(model, "openvino", tmp_path / "ir", compression_type="int8")
    assert not (tmp_path / "ir").exists()


def test_anomalib_export_cli_writes_an_ir_that_matches_the_checkpoint(
    fitted, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``anomalib export`` (CflowAD; the CLI path is the same for all three models, one subprocess stays fast)."""
    _, engine = fitted("CflowAD")
    checkpoint = next(Path(engine.trainer.default_root_dir).rglob("*.ckpt"))
    command = [str(Path(sys.executable).with_name("anomalib")), "export", "--model", "flowad_plugins.CflowAD",
               "--model.backbone", "efficientnet_lite0", "--model.layers", "[blocks.2, blocks.4]",
               "--ckpt_path", str(checkpoint), "--export_type", "openvino", "--input_size", "[128,128]",
               "--default_root_dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    ir_path = next(tmp_path.rglob("model.xml"))
    images = _test_images(synthetic_root)
    with torch.no_grad():
        reference = flowad_plugins.CflowAD.load_from_checkpoint(checkpoint, map_location="cpu").eval()(images)
    monkeypatch.chdir(tmp_path)
    prediction = OpenVINOInferencer(ir_path, device="CPU", config=openvino_config("f32")).predict(images)
    _check_parity(reference, _inferencer_outputs(prediction))


def test_unsupported_options_raise_clear_errors(tmp_path: Path) -> None:
    model = flowad_plugins.CflowAD(**TINY_CFLOW)
    with pytest.raises(ValueError, match="OpenVINO export only"):
        export_model(model, "onnx", tmp_path, compression_type="fp16")
    with pytest.raises(ValueError, match="allowed values"):
        export_model(model, "openvino", tmp_path, compression_type="int4")
    with pytest.raises(ValueError, match="export_type must be one of"):
        export_model(model, "torch", tmp_path)
    with pytest.raises(ValueError, match="input_size must be two positive integers"):
        export_model(model, "onnx", tmp_path, input_size=(128,))
    with pytest.raises(ValueError, match=r"precision='int4'.*allowed values: \['bf16', 'default', 'f16', 'f32'\]"):
        openvino_config("int4")
    assert openvino_config("f32") == {"INFERENCE_PRECISION_HINT": "f32"}
    assert not list(tmp_path.iterdir()), "a refused export must not write files"


def test_a_vit_backbone_ends_after_its_last_block_not_its_patch_embedding(tmp_path: Path) -> None:
    """A ViT runs one convolution (the patch embedding) and then its blocks' linear layers: the head found in its
    export starts after the last block, so the float32 marks and the INT8 scope keep every block in the backbone."""
    import onnx

    from flowad_plugins import FastFlow
    from flowad_plugins.export.onnx_graph import backbone_layer_count, flow_head_names

    model = FastFlow(backbone="deit_tiny_patch16_224", layers=["blocks.3"], pre_trained=False, flow_steps=2,
                     hidden_ratio=0.16).eval()
    assert backbone_layer_count(model, (224, 224)) == 1 + 4 * 4  # patch embedding; qkv, proj, fc1, fc2 per block
    onnx_path = model.to_onnx(tmp_path, input_size=(224, 224))
    head = flow_head_names(model, onnx_path, (224, 224))
    attention = [node.name for node in onnx.load(str(onnx_path), load_external_data=False).graph.node
                 if "attention" in node.name]
    assert attention and not head & set(attention)
    assert any(name.startswith("node_conv2d_") for name in head)  # the flow head's convolutions

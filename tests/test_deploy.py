"""Exported IRs compile and run at the CPU's default precision whatever layers are marked float32.

On CPUs whose default precision is bf16 (AVX512-BF16/AMX), OpenVINO's CPU plugin cannot run a fused
Convolution + residual Add + ReLU whose convolution is marked float32 and whose ReLU is not
(``benchmarks/fused_precision_boundary.py``); ``mark_precise`` therefore marks what the plugin fuses into a marked
convolution with it. Here: every mark subset of the minimal pattern, and a small deployment matrix
(``benchmarks/deploy_matrix.py`` in full) of a tiny FastFlow on ResNet-18, the backbone of the shipped
``fastflow_resnet18.yaml`` that failed: both precisions, batch 1 and 8, anomalib's ``OpenVINOInferencer`` and
``flowad-predict``, four float32 markings, against torch.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import torch
from conftest import REPO

if str(REPO / "benchmarks") not in sys.path:
    sys.path.append(str(REPO / "benchmarks"))  # the harness lives next to the scripts, outside the package

from fused_precision_boundary import build, first_error, layer_names
from harness.deploy import MARKINGS, export, reference_outputs, run_ir

import flowad_plugins
from flowad_plugins.export.precision import mark_precise

INPUT_SIZE = (64, 64)
TINY_RESNET_FASTFLOW = {"backbone": "resnet18", "layers": ["layer1", "layer2", "layer3"], "flow_steps": 2,
                        "conv3x3_only": True, "hidden_ratio": 1.0, "pre_trained": False, "input_size": INPUT_SIZE}


@pytest.mark.parametrize("pattern", ["basic_block", "projection_shortcut"])
def test_no_float32_marking_splits_a_fused_convolution(pattern: str, tmp_path: Path) -> None:
    """Every subset of marks on a residual block runs at the default precision, batch 1 and 8."""
    model = build(pattern, dynamic_batch=True)
    names = layer_names(model)
    xml = tmp_path / "block.xml"
    failures = []
    for bits in itertools.product((False, True), repeat=len(names)):
        chosen = {name for name, bit in zip(names, bits, strict=True) if bit}
        ov.save_model(model, xml, compress_to_fp16=False)
        mark_precise(xml, lambda name, _, chosen=chosen: name in chosen)
        error = first_error(xml, (1, 8))
        if error:
            failures.append((sorted(chosen), error))
    assert not failures, failures[:3]


def test_fused_chain_follows_a_marked_convolution(tmp_path: Path) -> None:
    """The residual Add and ReLU fused into a marked convolution are marked with it; the next convolution is not."""
    from flowad_plugins.export.precision import marked_layer_names

    xml = tmp_path / "block.xml"
    ov.save_model(build("basic_block", dynamic_batch=True), xml, compress_to_fp16=False)
    assert mark_precise(xml, lambda name, _: name == "conv2") == 3
    assert marked_layer_names(xml) == {"conv2", "add", "relu2"}
    ov.save_model(build("basic_block", dynamic_batch=True), xml, compress_to_fp16=False)
    assert mark_precise(xml, lambda name, _: name == "conv2", follow_fusion=False) == 1


def _test_images(count: int = 8) -> np.ndarray:
    from deploy_matrix import test_images

    return test_images(INPUT_SIZE, count)


@pytest.fixture(scope="module")
def resnet_fastflow(tmp_path_factory: pytest.TempPathFactory):
    """(model, images ``8×64×64×3`` uint8, torch reference outputs, folder) of an untrained tiny ResNet-18 FastFlow."""
    torch.manual_seed(0)
    model = flowad_plugins.FastFlow(**TINY_RESNET_FASTFLOW).eval()
    images = _test_images()
    reference = reference_outputs(model, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    return model, images, reference, tmp_path_factory.mktemp("deploy")


@pytest.mark.parametrize("compression", ["FP32", "FP16"])
def test_resnet_fastflow_deploys_at_every_precision_batch_runtime_and_marking(resnet_fastflow,
                                                                             compression: str) -> None:
    model, images, reference, folder = resnet_fastflow
    xml = export(model, folder / compression, compression, INPUT_SIZE)
    markings = MARKINGS if compression == "FP32" else ("exported",)
    cells = run_ir(xml, images, reference, compression, folder / compression, markings)
    assert len(cells) == (2 * 2 * 2) + (len(markings) - 1) * 2 * 2  # exported: 2 precisions; others: default only
    broken = [cell for cell in cells if not (cell["compiles"] and cell["runs"])]
    assert not broken, broken[:3]
    mismatched = [cell for cell in cells if cell["marks"] == "exported" and not cell["parity"]]
    assert not mismatched, mismatched[:3]


def test_flowad_predict_cli_runs_the_exported_ir_at_the_default_precision(resnet_fastflow, tmp_path: Path) -> None:
    """``flowad-predict model.xml folder --batch-size 8`` (``--precision auto``: the default for our IRs)."""
    from PIL import Image

    from flowad_plugins.edge.cli import main

    model, images, reference, folder = resnet_fastflow
    xml = folder / "FP32" / "weights" / "openvino" / "model.xml"
    if not xml.is_file():
        xml = export(model, folder / "FP32", "FP32", INPUT_SIZE)
    for index, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{index}.png")
    assert main([str(xml), str(tmp_path), "--out", str(tmp_path / "out"), "--batch-size", "8", "--no-overlays"]) == 0
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert summary["precision"] == "default" and len(summary["results"]) == len(images)
    scores = [record["score"] for record in sorted(summary["results"], key=lambda r: int(Path(r["path"]).stem))]
    from scipy.stats import spearmanr

    assert spearmanr(scores, reference["pred_score"])[0] >= 0.95

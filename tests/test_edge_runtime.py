"""Torch-free runtime: ``flowad-predict`` on an exported tiny CflowAD in a process where torch cannot be imported.

One tiny CflowAD is fitted for 1 epoch on the generated 128-px data and exported once through ``Engine.export``
(OpenVINO, static 128×128 input, threshold metadata stamped in). The runtime then runs in a subprocess whose
``sys.meta_path`` refuses torch, torchvision, lightning and anomalib; its scores must match the torch model's on
the same pixels, including for RGBA, 16-bit, grayscale and EXIF-rotated copies, and paths with spaces and
non-ASCII characters. A truncated PNG and an empty file are skipped and reported.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CFLOW, synthetic_datamodule
from PIL import Image

BLOCKED = ("torch", "torchvision", "lightning", "pytorch_lightning", "anomalib")
RUN_WITHOUT_TORCH = f"""
import sys
class RefuseTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("blocked in the torch-free runtime test: " + name)
sys.meta_path.insert(0, RefuseTorch())
from flowad_plugins.edge.cli import main
status = main(sys.argv[1:])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
assert not leaked, leaked
sys.exit(status)
"""
SCORE_TOLERANCE = 1e-4  # FP32 IR vs torch, normalised scores


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> tuple[Path, object]:
    """(IR path, fitted eval-mode CflowAD) — exported with ``Engine.export`` at 128×128, threshold metadata added."""
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    import flowad_plugins
    from flowad_plugins.post_processing import write_threshold_metadata

    workdir = tmp_path_factory.mktemp("edge")
    seed_everything(0)
    model = flowad_plugins.CflowAD(**TINY_CFLOW)
    model.pre_processor = model.configure_pre_processor((128, 128))
    engine = Engine(max_epochs=1, accelerator="cpu", devices=1, logger=False, default_root_dir=workdir,
                    enable_progress_bar=False)
    engine.fit(model=model, datamodule=synthetic_datamodule(synthetic_root))
    model.eval()
    ir_path = engine.export(model, ExportType.OPENVINO, export_root=workdir / "export", input_size=(128, 128))
    write_threshold_metadata(ir_path, model.post_processor)
    return Path(ir_path), model


def _torch_scores(model, images: list[np.ndarray]) -> np.ndarray:
    """The torch model's normalised scores for ``H×W×3`` float images in [0, 1]."""
    import torch

    with torch.no_grad():
        batch = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy()).float()
        return model(batch).pred_score.numpy()


def _run(ir_path: Path, inputs: list[Path], out: Path, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", RUN_WITHOUT_TORCH, str(ir_path), *map(str, inputs), "--out", str(out), *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _variants(source: Path, folder: Path) -> dict[str, np.ndarray]:
    """Write copies of ``source`` in other formats into ``folder``; name → the pixels the model should see."""
    rgb = np.asarray(Image.open(source).convert("RGB"))
    expected = {"plain copy.png": rgb / 255.0}
    shutil.copy(source, folder / "plain copy.png")
    alpha = np.random.default_rng(0).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(folder / "rgba.png")
    expected["rgba.png"] = rgb / 255.0  # alpha dropped, as anomalib's reader does
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    Image.fromarray(gray).save(folder / "gray.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "gray16.png")  # 16-bit: x·257/65535 = x/255
    assert Image.open(folder / "gray16.png").mode.startswith("I")
    expected["gray.png"] = expected["gray16.png"] = np.repeat(gray[..., None], 3, axis=2) / 255.0
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: displayed after a 90° clockwise turn
    Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90).save(folder / "exif rotated.png", exif=exif)
    expected["exif rotated.png"] = rgb / 255.0
    return {name: image.astype(np.float32) for name, image in expected.items()}


def test_predicts_without_torch_and_matches_the_torch_model(exported, synthetic_root: Path, tmp_path: Path) -> None:
    ir_path, model = exported
    test_images = sorted((synthetic_root / "surface" / "test").rglob("*.png"))
    folder = tmp_path / "Prüfbilder 検査 line 1"
    folder.mkdir()
    originals = {}
    for index, path in enumerate(test_images[::3]):
        name = f"{path.parent.name} {index}.png"
        shutil.copy(path, folder / name)
        originals[name] = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    (folder / "variants").mkdir()
    variants = _variants(test_images[1], folder / "variants")
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(test_images[0].read_bytes()[:120])
    out = tmp_path / "results ü"

    result = _run(ir_path, [folder], out, "--batch-size", "3", "--precision", "f32")  # float32: exact parity
    assert result.returncode == 0, result.stderr[-3000:]
    for bad in ("empty.png", "truncated.png"):
        assert f"warning: skipped {folder / bad}" in result.stderr, result.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert summary["complete"] and summary["input_size"] == [128, 128]
    assert summary["precision"] == "f32"
    assert sorted(Path(item["path"]).name for item in summary["skipped"]) == ["empty.png", "truncated.png"]
    assert "false-alarm rate" in summary["threshold"]["description"]  # read from the IR's threshold metadata
    expected = {**originals, **{f"variants/{name}": image for name, image in variants.items()}}
    records = {Path(r["path"]).relative_to(folder).as_posix(): r for r in summary["results"]}
    assert sorted(records) == sorted(expected)
    names = sorted(expected)
    reference = _torch_scores(model, [expected[name] for name in names])
    scores = np.array([records[name]["score"] for name in names])
    assert np.abs(scores - reference).max() <= SCORE_TOLERANCE, dict(zip(names, scores - reference, strict=True))
    assert [records[name]["label"] for name in names] == (reference > 0.5).tolist()
    assert reference.max() - reference.min() > 10 * SCORE_TOLERANCE  # the images are told apart

    with open(out / "results.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == [r["path"] for r in summary["results"]]
    for record in summary["results"]:
        overlay = Image.open(record["overlay"])
        assert overlay.mode == "RGB" and overlay.size == (128, 128)
    assert len({r["overlay"] for r in summary["results"]}) == len(records)


def test_auto_precision_is_the_default_only_for_marked_irs(exported, tmp_path: Path) -> None:
    """``precision="auto"``: the CPU's default for an IR with float32 marks, float32 for one without (or ONNX)."""
    from flowad_plugins.edge.runtime import resolve_precision

    ir_path, _ = exported
    unmarked = tmp_path / "unmarked.xml"
    unmarked.write_text(ir_path.read_text(encoding="utf-8").replace('name="precise"', 'name="other"'),
                        encoding="utf-8")
    assert resolve_precision(ir_path, "auto") == "default"
    assert resolve_precision(unmarked, "auto") == "f32"
    assert resolve_precision(tmp_path / "model.onnx", "auto") == "f32"
    assert resolve_precision(ir_path, "f32") == "f32"


def test_explicit_threshold_and_bad_arguments(exported, synthetic_root: Path, tmp_path: Path) -> None:
    ir_path, _ = exported
    image = sorted((synthetic_root / "surface" / "test" / "good").glob("*.png"))[0]
    result = _run(ir_path, [image], tmp_path / "strict", "--threshold", "0.001", "--no-overlays")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "strict" / "results.json").read_text())["results"][0]
    assert record["label"] is True and record["threshold_source"] == "command line" and record["overlay"] is None
    result = _run(ir_path, [image], tmp_path / "bad", "--threshold", "1.5")
    assert result.returncode == 2 and "threshold must be a normalised score in (0, 1)" in result.stderr
    result = _run(ir_path, [tmp_path / "missing"], tmp_path / "bad")
    assert result.returncode == 2 and "is neither an image file nor a folder" in result.stderr


def test_a_non_finite_score_or_map_is_reported_anomalous() -> None:
    from flowad_plugins.edge.runtime import classify

    heat = np.zeros((4, 4), np.float32)
    for score in (float("nan"), float("inf")):
        label, reason = classify(score, heat, threshold=0.5)
        assert label is True and "not finite" in reason
    broken = heat.copy()
    broken[1, 2] = np.nan
    label, reason = classify(0.1, broken, threshold=0.5)
    assert label is True and "1 non-finite pixels" in reason
    assert classify(0.1, heat, threshold=0.5) == (False, "") and classify(0.9, heat, threshold=0.5) == (True, "")


def test_the_lazy_package_root_still_resolves_models_for_the_anomalib_cli(tmp_path: Path) -> None:
    """``anomalib train --model flowad_plugins.CflowAD``: the class is found through the root's ``__getattr__``."""
    command = [str(Path(sys.executable).with_name("anomalib")), "train", "--model", "flowad_plugins.CflowAD",
               "--model.backbone", "efficientnet_lite0", "--model.layers", "[blocks.2, blocks.4]",
               "--data", "flowad_plugins.data.SyntheticAD", "--print_config"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "class_path: flowad_plugins.CflowAD" in result.stdout
    assert "coupling_blocks:" in result.stdout  # a default read from CflowAD's signature: the class was imported


def test_exports_stamp_the_metadata_key_the_edge_reads() -> None:
    """``post_processing`` writes threshold metadata under the key ``edge.settings`` defines for both sides."""
    from flowad_plugins import post_processing
    from flowad_plugins.edge.settings import METADATA_KEY

    assert post_processing.METADATA_KEY == METADATA_KEY

"""The benchmark harness itself: a quick run on the tiny pair, the result schema, errors per cell, bad input."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "benchmarks") not in sys.path:
    sys.path.append(str(REPO / "benchmarks"))  # the harness lives next to the scripts, outside the package

from harness.edge_report import edge_rows, edge_table  # noqa: E402
from harness.grid import BenchConfig, run_task  # noqa: E402
from harness.report import compute_ratios, validate_result  # noqa: E402
from harness.runner import percentile  # noqa: E402

TINY_PAIR = ["CflowAD-tiny", "anomalib.Cflow-tiny"]


def load_cli():
    spec = importlib.util.spec_from_file_location("benchmark_cli", REPO / "benchmarks" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """``benchmark.py --quick`` on the tiny CflowAD pair: torch + ONNX Runtime, batch 1, 1 training epoch (every
    cell is a fresh process: one batch size keeps the run short)."""
    out_dir = tmp_path_factory.mktemp("bench")
    result = load_cli().main(["--quick", "--models", *TINY_PAIR, "--devices", "cpu", "--batch-sizes", "1",
                              "--out-dir", str(out_dir), "--name", "quick"])
    return result, out_dir


def test_quick_run_writes_json_markdown_plot_and_readme_section(quick_run: tuple[dict, Path]) -> None:
    _, out_dir = quick_run
    for suffix in (".json", ".md", ".png", "_readme.md"):
        assert (out_dir / f"quick{suffix}").stat().st_size > 0, suffix
    saved = json.loads((out_dir / "quick.json").read_text())
    validate_result(saved)
    assert saved["machine"]["versions"]["torch"] and saved["machine"]["threads"] >= 1
    assert "--quick" in saved["command"]
    assert "| CflowAD-tiny / anomalib.Cflow-tiny | torch |" in (out_dir / "quick.md").read_text()


def test_every_cell_is_measured_on_its_own_with_positive_figures(quick_run: tuple[dict, Path]) -> None:
    result, _ = quick_run
    keys = [(cell["model"], cell["backend"], cell["batch_size"]) for cell in result["cells"]]
    expected = {(model, backend, batch) for model in TINY_PAIR for backend in ("torch", "onnxruntime")
                for batch in (1,)}
    assert sorted(keys) == sorted(expected), "one cell per model × backend × batch"
    torch_cells = [cell for cell in result["cells"] if cell["backend"] == "torch"]
    assert all(cell["status"] == "ok" for cell in torch_cells), [cell.get("error") for cell in torch_cells]
    for cell in result["cells"]:
        if cell["status"] != "ok":
            assert cell["error"], cell
            continue
        assert 0 < cell["latency_ms_p50"] <= cell["latency_ms_p95"]
        assert cell["throughput_img_s"] > 0 and cell["peak_rss_mb"] > 0
        assert len(cell["times_s"]) >= result["config"]["min_repeats"]
        # each cell ran in its own process: its peak covers its own runtime and model, not the parent's
        assert cell["peak_rss_mb"] >= cell["baseline_rss_mb"] > 0
        assert cell["parameters"] > 0 and cell["file_bytes"] > 0
    # a fresh process per cell: ONNX Runtime cells don't carry torch's memory
    onnx_cells = [cell for cell in result["cells"] if cell["backend"] == "onnxruntime" and cell["status"] == "ok"]
    if onnx_cells:
        assert max(cell["baseline_rss_mb"] for cell in onnx_cells) < min(c["baseline_rss_mb"] for c in torch_cells)


def test_training_time_and_ratios_per_model(quick_run: tuple[dict, Path]) -> None:
    result, _ = quick_run
    for model in TINY_PAIR:
        train = result["models"][model]["sizes"]["128"]["train"]
        assert "error" not in train, train
        assert train["train_seconds_per_epoch"] > 0 and train["train_images"] > 0
        assert result["models"][model]["parameters"] > 0
    torch_ratios = [ratio for ratio in result["ratios"] if ratio["backend"] == "torch"]
    assert {ratio["batch_size"] for ratio in torch_ratios} == {1}
    assert all(ratio["speedup"] > 0 and ratio["memory"] > 0 for ratio in torch_ratios)


def test_validate_result_rejects_missing_keys_and_non_positive_figures(quick_run: tuple[dict, Path]) -> None:
    result, _ = quick_run
    broken = copy.deepcopy(result)
    ok_cell = next(cell for cell in broken["cells"] if cell["status"] == "ok")
    ok_cell["latency_ms_p50"] = 0.0
    with pytest.raises(ValueError, match="latency_ms_p50"):
        validate_result(broken)
    broken = copy.deepcopy(result)
    del broken["machine"]["versions"]["openvino"]
    with pytest.raises(ValueError, match="openvino"):
        validate_result(broken)
    broken = copy.deepcopy(result)
    broken["cells"][0] = {**broken["cells"][0], "status": "error", "error": ""}
    with pytest.raises(ValueError, match="without an error string"):
        validate_result(broken)


def test_a_failing_backend_is_an_error_string_not_a_crash(tmp_path: Path) -> None:
    task = {"kind": "time", "model": "CflowAD-tiny", "backend": "onnxruntime", "device": "cpu", "image_size": 64,
            "batch_size": 1, "file": str(tmp_path / "missing.onnx"), "threads": 1, "warmup": 1, "min_repeats": 1,
            "max_repeats": 1, "min_seconds": 0.0}
    result = run_task(task, tmp_path / "cell", timeout_s=120, threads=1)
    assert "missing.onnx" in result["error"] or "NO_SUCHFILE" in result["error"], result
    assert result["peak_rss_mb"] > 0


def test_ratios_need_both_sides() -> None:
    cell = {"family": "cflow", "backend": "torch", "device": "cpu", "image_size": 256, "batch_size": 1,
            "status": "ok", "latency_ms_p50": 10.0, "throughput_img_s": 100.0, "peak_rss_mb": 500.0,
            "file_bytes": 1000}
    ours = {**cell, "model": "CflowAD", "ours": True}
    theirs = {**cell, "model": "anomalib.Cflow", "ours": False, "throughput_img_s": 25.0, "latency_ms_p50": 40.0,
              "file_bytes": 4000}
    assert compute_ratios({"cells": [ours]}) == []
    (ratio,) = compute_ratios({"cells": [ours, theirs]})
    assert ratio["speedup"] == 4.0 and ratio["file_size"] == 0.25 and ratio["latency_ms"] == [10.0, 40.0]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("backends", ["tensorrt"], "allowed: \\['torch', 'onnxruntime'"),
    ("models", ["Patchcore"], "allowed: \\['CflowAD'"),
    ("devices", ["tpu"], "allowed: \\['cpu', 'cuda'\\]"),
    ("batch_sizes", [0], "batch_sizes must be"),
    ("parts", ["head"], "allowed: \\['model', 'backbone'\\]"),
])
def test_bad_grid_names_the_parameter_and_allowed_values(field: str, value: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BenchConfig(**{field: value}).validate()


def test_percentile_interpolates() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([1.0, 2.0, 3.0], 0.95) == pytest.approx(2.9)


def test_one_latency_definition_interleaves_rounds_and_reports_their_median() -> None:
    from harness.timing import interleaved_wall_times, median_latencies_ms, median_ms

    calls: list[str] = []
    (times,) = interleaved_wall_times([lambda: calls.append("x")], warmup=2, repeats=3, min_seconds=10.0,
                                      max_repeats=3)
    assert len(times) == 3 and len(calls) == 5  # warm-up untimed; max_repeats caps the min_seconds wish
    assert [len(t) for t in interleaved_wall_times([lambda: None], warmup=0, repeats=4)] == [4]
    order: list[str] = []
    per_call = interleaved_wall_times([lambda: order.append("a"), lambda: order.append("b")], warmup=1, repeats=2,
                                      before_round=lambda: order.append("|"))
    assert order == ["a", "b", "|", "a", "b", "|", "b", "a"]  # warm-up, then the order reverses every round
    assert [len(t) for t in per_call] == [2, 2] and all(t >= 0 for ts in per_call for t in ts)
    assert median_ms([0.003, 0.001, 0.002]) == pytest.approx(2.0)
    assert len(median_latencies_ms([lambda: None, lambda: None], warmup=0, repeats=3)) == 2
    with pytest.raises(ValueError, match="calls"):
        interleaved_wall_times([])


def test_shipped_configs_and_checkpoint_loading_name_the_allowed_models() -> None:
    from harness.models import SHIPPED_CONFIGS, load_checkpoint, shipped_init

    assert set(SHIPPED_CONFIGS) == {"CflowAD", "FastFlow", "CSFlow"}
    assert "seed" not in shipped_init("CSFlow") and shipped_init("CSFlow")["backbone"] == "efficientnet_lite0"
    with pytest.raises(ValueError, match="CflowAD"):
        load_checkpoint("Cflow", "missing.ckpt")


def test_edge_rows_give_both_ratios_and_multiply_add_rates() -> None:
    base = {"family": "cflow", "backend": "openvino-fp32", "device": "cpu", "image_size": 256, "batch_size": 1,
            "status": "ok", "precision": "f32"}
    cells = [{**base, "model": "CflowAD", "ours": True, "part": "model", "throughput_img_s": 50.0,
              "multiply_adds_per_image": 2e9},
             {**base, "model": "CflowAD", "ours": True, "part": "backbone", "throughput_img_s": 100.0,
              "multiply_adds_per_image": 1e9},
             {**base, "model": "anomalib.Cflow", "ours": False, "part": "model", "throughput_img_s": 10.0,
              "multiply_adds_per_image": 4e9}]
    result = {"cells": cells, "models": {"CflowAD": {"family": "cflow", "ours": True},
                                         "anomalib.Cflow": {"family": "cflow", "ours": False}},
              "machine": {"cpu": "test CPU", "threads": 2, "isa_flags": {"avx512f": True, "amx_bf16": False},
                          "versions": {"openvino": "x"}}}
    ours = next(row for row in edge_rows(result) if row["model"] == "CflowAD")
    assert ours["ours_over_anomalib_time"] == 0.2 and ours["model_over_backbone_time"] == 2.0
    assert ours["gmac_per_s"] == 100.0 and ours["backbone_gmac_per_s"] == 100.0 and ours["ms_per_image"] == 20.0
    table = "\n".join(edge_table(result))
    assert "test CPU (avx512f)" in table and "| CflowAD | OV f32 | 256 | 1 | f32 | 20.0 | 10.0 | 0.2× | 2.0× |" in table


def test_one_registry_builds_anomalib_csflow_on_our_backbone_without_download() -> None:
    import torch
    from harness.models import backbone_of, build_benchmark_model

    model = build_benchmark_model("anomalib.Csflow", image_size=64).eval()
    trunk = model.model.feature_extractor.feature_extractor.trunk
    assert len(trunk) == 2 + 5  # conv_stem, bn1, blocks.0 … blocks.4: efficientnet_lite0 up to the same layer
    with torch.inference_mode():
        output = model.model(torch.rand(1, 3, 64, 64))
        features = backbone_of(model)(torch.rand(1, 3, 64, 64))
    assert output.anomaly_map.shape[-2:] == (64, 64) and output.pred_score.shape == (1,)
    assert [tuple(f.shape[1:]) for f in features] == [(112, 4, 4), (112, 2, 2), (112, 1, 1)]


def test_accuracy_table_rows_are_valid_evaluate_commands() -> None:
    """Every row of ``accuracy_table.py`` parses as an ``evaluate.py`` command with the same budget, an existing config
    for ours, anomalib's class otherwise, and its own result file."""
    import accuracy_table
    import evaluate
    import yaml

    parser = evaluate.argument_parser()
    outs = set()
    for category in accuracy_table.ROOTS:
        for name in accuracy_table.ROWS:
            args = parser.parse_args(accuracy_table.row_arguments(name, category, 5.0))
            assert (args.category, args.max_minutes) == (category, 5.0)
            assert (args.config is None) == name.startswith("anomalib_"), name
            if args.config is not None:
                config = yaml.safe_load((REPO / args.config).read_text())
                assert config["model"]["class_path"].startswith("flowad_plugins."), name
            else:
                assert args.model.startswith("anomalib.") and args.epochs, name
            outs.add(args.out)
    assert len(outs) == len(accuracy_table.ROOTS) * len(accuracy_table.ROWS)

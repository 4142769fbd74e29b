"""The benchmark harness itself: a quick run on the tiny pair, the result schema, errors per cell, bad input."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from flowad_plugins.bench.grid import BenchConfig, run_task
from flowad_plugins.bench.report import compute_ratios, validate_result
from flowad_plugins.bench.runner import percentile

REPO = Path(__file__).resolve().parents[1]
TINY_PAIR = ["CflowAD-tiny", "anomalib.Cflow-tiny"]


def load_cli():
    spec = importlib.util.spec_from_file_location("benchmark_cli", REPO / "benchmarks" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """``benchmark.py --quick`` on the tiny CflowAD pair: torch + ONNX Runtime, batches 1 and 2, 1 training epoch."""
    out_dir = tmp_path_factory.mktemp("bench")
    result = load_cli().main(["--quick", "--models", *TINY_PAIR, "--devices", "cpu", "--out-dir", str(out_dir),
                              "--name", "quick"])
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
                for batch in (1, 2)}
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
    assert {ratio["batch_size"] for ratio in torch_ratios} == {1, 2}
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
])
def test_bad_grid_names_the_parameter_and_allowed_values(field: str, value: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BenchConfig(**{field: value}).validate()


def test_percentile_interpolates() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([1.0, 2.0, 3.0], 0.95) == pytest.approx(2.9)


def test_timing_loops_count_calls_and_interleave() -> None:
    from flowad_plugins.bench.timing import interleaved_wall_times, wall_times

    calls: list[str] = []
    times = wall_times(lambda: calls.append("x"), warmup=2, min_repeats=3, max_repeats=3, min_seconds=10.0)
    assert len(times) == 3 and len(calls) == 5  # warm-up untimed; max_repeats caps the min_seconds wish
    assert len(wall_times(lambda: None, warmup=0, min_repeats=4)) == 4
    order: list[str] = []
    per_call = interleaved_wall_times([lambda: order.append("a"), lambda: order.append("b")], warmup=1, repeats=2,
                                      before_round=lambda: order.append("|"))
    assert order == ["a", "b", "|", "a", "b", "|", "b", "a"]  # warm-up, then the order reverses every round
    assert [len(t) for t in per_call] == [2, 2] and all(t >= 0 for ts in per_call for t in ts)

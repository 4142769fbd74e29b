"""Scale-out and robustness: DDP, mixed precision, exact resume, non-finite loss.

DDP runs ``Engine(strategy="ddp", accelerator="cpu", devices=2)`` (gloo) in a subprocess: Lightning's "ddp"
relaunches the running *script* for rank 1, so this file doubles as that script (``__main__`` below).

Why DDP should match one process here: every rank gets 4 of the 8 training images, the single process all 8
in one batch, and each loss is a mean over images (CflowAD: one Adam step per batch, a mean over all fibers),
so DDP's gradient average equals the single-process gradient up to float summation order; statistics are
summed over ranks. What is left is float rounding (stated tolerances below).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest helpers when run as the DDP script

IMAGE_SIZE = 64
# DDP runs: (run name, model, init overrides). "CflowAD" takes one Adam step per batch (comparable with one
# process); "CflowAD_multistep" takes 4 steps per batch per rank (several backward passes per forward).
DDP_RUNS = [("CflowAD", "CflowAD", {"fiber_batch_size": 4096}), ("FastFlow", "FastFlow", {}),
            ("CSFlow", "CSFlow", {}), ("CflowAD_multistep", "CflowAD", {"fiber_batch_size": 64})]
DDP_EPOCHS = 3
NUM_TRAIN = 10  # 8 train + 2 validation (val_split_ratio 0.2)
# Measured worst cases were ~1e-6 (weights, statistics) and ~1e-5 (maps); the bounds leave margin for
# summation order on other CPUs while still catching a missing all-reduce (differences of 1e-2 and more).
DDP_WEIGHT_TOLERANCE = 1e-4
DDP_MAP_TOLERANCE = 1e-3


def build(name: str, **overrides):
    """Tiny model ``name`` (``conftest.TINY_CONFIGS``) for ``IMAGE_SIZE`` inputs."""
    from conftest import tiny_model

    return tiny_model(name, (IMAGE_SIZE, IMAGE_SIZE), **overrides)


def datamodule(root: Path, batch_size: int):
    from flowad_plugins.data import SyntheticAD

    return SyntheticAD(root=root, category="surface", image_size=IMAGE_SIZE, num_train=NUM_TRAIN, num_test_good=3,
                       num_test_per_defect=2, train_batch_size=batch_size, eval_batch_size=8)


def engine(folder: Path, epochs: int, **kwargs):
    from anomalib.engine import Engine

    return Engine(max_epochs=epochs, accelerator="cpu", logger=False, default_root_dir=folder,
                  enable_progress_bar=False, enable_model_summary=False, **{"devices": 1, **kwargs})


def model_state(model) -> dict[str, torch.Tensor]:
    """The torch model's parameters and buffers (flows, norms, statistics), not the post-processor's."""
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def fixed_images(root: Path) -> torch.Tensor:
    """The test images (4×3×64×64), pre-processed as the models see them."""
    dm = datamodule(root, 8)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    return batch.image


def anomaly_maps(model, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.model(images).anomaly_map


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated ``surface`` data at 64 px: 10 train images (8 after the validation split)."""
    from flowad_plugins.data import SyntheticSpec, generate_dataset

    root = tmp_path_factory.mktemp("synthetic64")
    generate_dataset(root, SyntheticSpec(category="surface", image_size=IMAGE_SIZE, num_train=NUM_TRAIN,
                                         num_test_good=3, num_test_per_defect=2))
    return root


# ----------------------------------------------------------------------------------------------- DDP


def _ddp_script(root: Path, out: Path) -> None:
    """Run in both ranks: train every ``DDP_RUNS`` entry with DDP, save each rank's model state and checks."""
    import torch.distributed as dist
    from lightning.pytorch import seed_everything

    from flowad_plugins.scoring import LikelihoodStatistics

    rank = 0
    for run_name, name, overrides in DDP_RUNS:
        seed_everything(0)
        model = build(name, **overrides)
        # a folder per rank: anomalib's Engine creates a new versioned folder in every rank, and two ranks racing
        # for the same "v0" fail with FileExistsError
        run = engine(out / run_name / f"rank{os.environ.get('LOCAL_RANK', '0')}", DDP_EPOCHS, strategy="ddp",
                     devices=2)
        run.fit(model=model, datamodule=datamodule(root, 4))
        rank = run.trainer.global_rank
        torch.save(model_state(model), out / f"{run_name}_rank{rank}.pt")
    # Statistics with different value counts per rank (rank 0: 5 and 3 values, rank 1: 2 and none).
    statistics = LikelihoodStatistics(num_scales=2)
    values = {0: (torch.arange(5.0), torch.tensor([1.0, 2.0, 4.0])), 1: (torch.tensor([10.0, 20.0]), None)}[rank]
    statistics.update_all(values)
    statistics.commit()
    report = {"world_size": dist.get_world_size(), "backend": dist.get_backend(),
              "mean": statistics.mean.tolist(), "std": statistics.std.tolist()}
    (out / f"statistics_rank{rank}.json").write_text(json.dumps(report))
    # Leave the process group explicitly: a gloo group still alive at interpreter exit can abort a rank with
    # "terminate called without an active exception" (exit -6) after every result was written.
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_output(small_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, __file__, "ddp", str(small_root), str(out)], env=env, cwd=out,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return out


def test_ddp_ranks_stay_synchronised(ddp_output: Path) -> None:
    """After DDP training both ranks hold the same flows, norms and statistics, bit for bit."""
    for run_name, _, _ in DDP_RUNS:
        rank0 = torch.load(ddp_output / f"{run_name}_rank0.pt")
        rank1 = torch.load(ddp_output / f"{run_name}_rank1.pt")
        assert rank0.keys() == rank1.keys()
        different = [key for key in rank0 if not torch.equal(rank0[key], rank1[key])]
        assert not different, f"{run_name}: ranks differ in {different[:5]}"
        assert bool(rank0["scorer.statistics.fitted"])


@pytest.mark.parametrize("run_name", ["CflowAD", "FastFlow", "CSFlow"])
def test_ddp_matches_a_single_process(run_name: str, ddp_output: Path, small_root: Path, tmp_path: Path) -> None:
    """2 ranks × 4 images = 1 process × 8 images: same weights, statistics and maps within float tolerance."""
    from lightning.pytorch import seed_everything

    name, overrides = next((n, o) for r, n, o in DDP_RUNS if r == run_name)
    seed_everything(0)
    single = build(name, **overrides)
    engine(tmp_path, DDP_EPOCHS).fit(model=single, datamodule=datamodule(small_root, 8))
    reference = model_state(single)

    distributed = build(name, **overrides)
    distributed.model.load_state_dict(torch.load(ddp_output / f"{run_name}_rank0.pt"))
    trained = [k for k, v in reference.items() if v.is_floating_point()]
    worst = max(float((reference[k] - distributed.model.state_dict()[k]).abs().max()) for k in trained)
    untrained = model_state(build(name, **overrides))  # its per-position statistics are still empty
    moved = max(float((reference[k] - untrained[k]).abs().max()) for k in trained
                if untrained[k].shape == reference[k].shape)
    assert moved > 100 * DDP_WEIGHT_TOLERANCE, "training did not change the model; the comparison would be empty"
    images = fixed_images(small_root)
    single_maps, ddp_maps = anomaly_maps(single, images), anomaly_maps(distributed, images)
    map_difference = float((single_maps - ddp_maps).abs().max())
    print(f"{run_name}: DDP vs single process: weights/statistics max |Δ| {worst:.2e} (training moved them by up "
          f"to {moved:.2e}), maps max |Δ| {map_difference:.2e} (map spread {float(single_maps.std()):.2f})")
    assert worst <= DDP_WEIGHT_TOLERANCE, f"{run_name}: DDP vs single-process weights differ by {worst:.2e}"
    assert torch.isfinite(ddp_maps).all()
    assert map_difference <= DDP_MAP_TOLERANCE, f"{run_name}: maps differ by {map_difference:.2e}"


def test_statistics_all_reduce_with_unequal_counts_per_rank(ddp_output: Path) -> None:
    """gloo all-reduce of the statistics pools all values, whatever each rank contributed (even nothing)."""
    pooled = [torch.tensor([0.0, 1, 2, 3, 4, 10, 20]), torch.tensor([1.0, 2.0, 4.0])]
    for rank in (0, 1):
        report = json.loads((ddp_output / f"statistics_rank{rank}.json").read_text())
        assert report["world_size"] == 2 and report["backend"] == "gloo"
        for scale, values in enumerate(pooled):
            assert report["mean"][scale] == pytest.approx(float(values.mean()), abs=1e-5)
            assert report["std"][scale] == pytest.approx(float(values.std(unbiased=False)), abs=1e-5)


# ------------------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("name", ["CflowAD", "FastFlow", "CSFlow"])
def test_bf16_mixed_trains_and_keeps_flows_in_float32(name: str, small_root: Path, tmp_path: Path) -> None:
    """``precision="bf16-mixed"`` trains without NaN; under autocast (bf16, and fp16 as CUDA's 16-mixed
    would run it) the maps are float32 and close to the fp32 maps: only the backbone ran in low precision."""
    from lightning.pytorch import seed_everything

    seed_everything(0)
    model = build(name)
    engine(tmp_path, 1, precision="bf16-mixed").fit(model=model, datamodule=datamodule(small_root, 4))
    assert all(torch.isfinite(v).all() for v in model_state(model).values() if v.is_floating_point())
    images = fixed_images(small_root)
    reference = anomaly_maps(model, images)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            output = model.model(images)
        assert output.anomaly_map.dtype == torch.float32 and output.pred_score.dtype == torch.float32
        assert torch.isfinite(output.anomaly_map).all()
        # backbone rounding (8-/11-bit mantissa) shifts the maps slightly; their pattern must stay
        correlation = torch.corrcoef(torch.stack([output.anomaly_map.flatten(), reference.flatten()]))[0, 1]
        assert float(correlation) >= 0.95, f"{dtype}: maps correlate {float(correlation):.3f} with fp32"


def test_flow_log_likelihood_is_float32_under_autocast() -> None:
    """CflowAD's fiber flow computes z, log-det and likelihood in float32 even from bf16 fibers."""
    from lightning.pytorch import seed_everything

    seed_everything(0)
    model = build("CflowAD").model
    fibers = torch.randn(32, model.encoder.channels[0])
    positions = torch.arange(32)
    reference = model.fiber_log_likelihood(0, fibers, positions, (8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.fiber_log_likelihood(0, fibers.bfloat16(), positions, (8, 8))
    assert mixed.dtype == torch.float32
    # only the bf16 rounding of the *input* fibers remains (the flow itself ran in float32)
    exact = model.fiber_log_likelihood(0, fibers.bfloat16().float(), positions, (8, 8))
    assert torch.equal(mixed, exact)
    assert float((mixed - reference).abs().max()) < 0.05


# ------------------------------------------------------------------------------------------------ resume


class _SimulatedInterruptionError(Exception):
    pass


@pytest.mark.parametrize("name", ["CflowAD", "FastFlow", "CSFlow"])
def test_resumed_run_ends_where_the_uninterrupted_run_ends(name: str, small_root: Path, tmp_path: Path) -> None:
    """Crash at the start of epoch 2, resume from the epoch-1 checkpoint: same weights, Adam state, LR and
    metrics as 3 uninterrupted epochs (tolerance 0: CPU float maths is deterministic for the same ops)."""
    from anomalib.callbacks.checkpoint import ModelCheckpoint
    from lightning.pytorch import Callback, seed_everything

    class InterruptAtEpoch(Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            del pl_module
            if trainer.current_epoch == 2:
                raise _SimulatedInterruptionError

    epochs, batch_size = 3, 4  # 2 batches per epoch; CflowAD takes 4 fiber steps per batch

    def fit(folder: str, callbacks: list, ckpt_path: Path | None = None):
        seed_everything(0)
        model = build(name)
        run = engine(tmp_path / folder, epochs, callbacks=callbacks)
        run.fit(model=model, datamodule=datamodule(small_root, batch_size), ckpt_path=ckpt_path)
        return model, run

    uninterrupted, full_run = fit("full", [])
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="epoch{epoch}", save_top_k=-1,
                                  auto_insert_metric_name=False)
    with pytest.raises(_SimulatedInterruptionError):
        fit("interrupted", [checkpoints, InterruptAtEpoch()])
    checkpoint = tmp_path / "ckpt" / "epoch1.ckpt"
    assert checkpoint.is_file(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    resumed, resumed_run = fit("resumed", [], ckpt_path=checkpoint)

    assert resumed_run.trainer.current_epoch == full_run.trainer.current_epoch == epochs
    assert resumed_run.trainer.global_step == full_run.trainer.global_step
    expected, actual = model_state(uninterrupted), model_state(resumed)
    assert all(torch.equal(expected[k], actual[k]) for k in expected), "weights or statistics differ"
    full_optimizer = full_run.trainer.optimizers[0].state_dict()
    resumed_optimizer = resumed_run.trainer.optimizers[0].state_dict()
    assert full_optimizer["param_groups"][0]["lr"] == resumed_optimizer["param_groups"][0]["lr"]
    for index, state in full_optimizer["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], resumed_optimizer["state"][index][key]), f"Adam {key} differs"
    if full_run.trainer.lr_scheduler_configs:
        full_scheduler = full_run.trainer.lr_scheduler_configs[0].scheduler.state_dict()
        resumed_scheduler = resumed_run.trainer.lr_scheduler_configs[0].scheduler.state_dict()
        assert full_scheduler["last_epoch"] == resumed_scheduler["last_epoch"] == epochs * 2
    images = fixed_images(small_root)
    assert torch.equal(anomaly_maps(uninterrupted, images), anomaly_maps(resumed, images))


# ------------------------------------------------------------------------------------- non-finite loss


@pytest.mark.parametrize("name", ["CflowAD", "FastFlow"])
def test_poisoned_batch_stops_training_and_keeps_the_previous_checkpoint(
    name: str, small_root: Path, tmp_path: Path
) -> None:
    """A NaN pixel in epoch 1 stops training with the cause named; the epoch-0 checkpoint loads and works."""
    from anomalib.callbacks.checkpoint import ModelCheckpoint
    from lightning.pytorch import Callback, seed_everything

    import flowad_plugins
    from flowad_plugins.models.common import NonFiniteLossError

    class PoisonEpochOne(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            del pl_module, batch_idx
            if trainer.current_epoch == 1:
                batch.image[0, :, 3, 3] = float("nan")

    seed_everything(0)
    model = build(name)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="epoch{epoch}", save_top_k=-1,
                                  auto_insert_metric_name=False)
    run = engine(tmp_path, 3, callbacks=[checkpoints, PoisonEpochOne()])
    with pytest.raises(NonFiniteLossError) as error:
        run.fit(model=model, datamodule=datamodule(small_root, 4))
    message = str(error.value)
    assert f"{name}: training loss became nan at epoch 1" in message
    assert "non-finite pixel values" in message and "ckpt_path" in message
    assert all(torch.isfinite(v).all() for v in model_state(model).values() if v.is_floating_point())

    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert saved == ["epoch0.ckpt"], saved
    restored = getattr(flowad_plugins, name).load_from_checkpoint(tmp_path / "ckpt" / "epoch0.ckpt")
    assert bool(restored.model.scorer.statistics.fitted)
    assert torch.isfinite(anomaly_maps(restored, fixed_images(small_root))).all()


def test_non_finite_loss_message_names_the_likely_cause() -> None:
    from flowad_plugins.models.common import NonFiniteLossError

    model = build("FastFlow", lr=10.0)
    with pytest.raises(NonFiniteLossError, match=r"loss became inf .*Likely causes: learning rate too high .*lr=10\.0"):
        model.check_finite_loss(torch.tensor(float("inf")), torch.zeros(2, 3, 8, 8))
    with pytest.raises(NonFiniteLossError, match=r"non-finite pixel values \(1 of 2 images\)"):
        model.check_finite_loss(torch.tensor(float("nan")), torch.tensor([0.0, float("nan")]).view(2, 1, 1, 1))
    model.check_finite_loss(torch.tensor(1.0))  # finite: no error


if __name__ == "__main__" and sys.argv[1:2] == ["ddp"]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _ddp_script(Path(sys.argv[2]), Path(sys.argv[3]))

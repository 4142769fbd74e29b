"""Thresholds at a chosen false-alarm rate, set from normal validation images only (``FlowPostProcessor``)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from anomalib.data import ImageBatch, InferenceBatch
from anomalib.engine import Engine
from anomalib.post_processing import PostProcessor
from conftest import SYNTHETIC_CLI_DATA
from lightning.pytorch import Callback, seed_everything
from torch.nn import functional as F

from flowad_plugins import FastFlow
from flowad_plugins.data import SyntheticAD
from flowad_plugins.post_processing import (
    MIN_NORMAL_IMAGES_FOR_PIXEL_FPR,
    FlowPostProcessor,
    false_alarm_threshold,
    read_threshold_metadata,
    required_normal_images,
    write_threshold_metadata,
)

FITTING = SimpleNamespace(sanity_checking=False)
TINY_FASTFLOW = {"backbone": "efficientnet_lite0", "layers": ["blocks.1", "blocks.2"], "flow_steps": 2}


def _beta_sd(rank: int, samples: int) -> float:
    """Spread of the realised rate of the ``rank``-th largest of ``samples`` normal scores: Beta(k, n+1−k)."""
    return math.sqrt(rank * (samples + 1 - rank) / ((samples + 1) ** 2 * (samples + 2)))


def _correlated_maps(count: int, generator: torch.Generator, size: int = 32) -> torch.Tensor:
    """``count×size×size`` smooth random fields plus a per-image offset: pixels of one map are correlated."""
    coarse = torch.randn(count, 1, 4, 4, generator=generator)
    maps = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return maps + 0.5 * torch.randn(count, 1, 1, generator=generator)


def _feed(post_processor: PostProcessor, scores: torch.Tensor, maps: torch.Tensor, labels: torch.Tensor,
          masks: torch.Tensor | None = None, batch_size: int = 50) -> None:
    """Run ``post_processor``'s validation hooks over the given predictions, as Lightning would."""
    post_processor.on_validation_epoch_start(FITTING, None)
    for start in range(0, len(scores), batch_size):
        part = slice(start, start + batch_size)
        batch = ImageBatch(image=torch.zeros(len(scores[part]), 3, *maps.shape[-2:]), gt_label=labels[part],
                           pred_score=scores[part], anomaly_map=maps[part],
                           gt_mask=None if masks is None else masks[part])
        post_processor.on_validation_batch_end(FITTING, None, batch)
    post_processor.on_validation_epoch_end(FITTING, None)


def test_order_statistic_threshold_is_calibrated_across_validation_samples() -> None:
    """Over many validation samples the realised false-alarm rate averages k/(n+1) = fpr, spread as Beta."""
    generator = torch.Generator().manual_seed(0)
    samples, fpr, replicates = 99, 0.05, 2000
    normal = torch.distributions.Normal(0.0, 1.0)
    realised = []
    for _ in range(replicates):
        threshold, rank = false_alarm_threshold(torch.randn(samples, generator=generator), fpr)
        realised.append(1 - float(normal.cdf(torch.tensor(threshold))))
    realised = torch.tensor(realised)
    assert rank == 5  # ⌊0.05·100⌋
    spread = _beta_sd(rank, samples)
    assert abs(float(realised.mean()) - rank / (samples + 1)) < 4 * spread / math.sqrt(replicates)
    assert 0.85 < float(realised.std()) / spread < 1.15


def test_required_counts() -> None:
    assert [required_normal_images(rate) for rate in (0.5, 0.1, 0.05, 0.01, 0.001)] == [1, 9, 19, 99, 999]
    with pytest.raises(ValueError, match="needs at least 99 normal samples; got 50"):
        false_alarm_threshold(torch.randn(50), 0.01)
    threshold, rank = false_alarm_threshold(torch.arange(50.0), 0.01, allow_fewer=True)
    assert (threshold, rank) == (49.0, 1)


def test_normal_only_validation_realises_requested_rates_on_fresh_normal_data() -> None:
    """Image and pixel thresholds from 400 normal images: fresh normal data is flagged at the requested rates."""
    generator = torch.Generator().manual_seed(1)
    post_processor = FlowPostProcessor(image_fpr=0.05, pixel_fpr=0.01)
    count = 400
    _feed(post_processor, torch.randn(count, generator=generator), _correlated_maps(count, generator),
          torch.zeros(count, dtype=torch.bool))
    report = post_processor.threshold_report
    assert report["normal_images"] == count and report["anomalous_images"] == 0
    assert report["image"]["source"] == report["pixel"]["source"] == "fpr"

    fresh = 4000
    scores, maps = torch.randn(fresh, generator=generator), _correlated_maps(fresh, generator)
    output = post_processor(InferenceBatch(pred_score=scores, anomaly_map=maps))
    # normalisation maps the raw threshold to 0.5: labels and masks are "raw value > raw threshold" (compared
    # away from the threshold itself, where float32 rounding of 0.5 + tiny may go either way); masks only on
    # images labelled anomalous
    pixel_flags = maps > report["pixel"]["raw_threshold"]
    for flags, expected, raw, threshold in (
            (output.pred_label, scores > report["image"]["raw_threshold"], scores, report["image"]["raw_threshold"]),
            (output.pred_mask, pixel_flags & output.pred_label[:, None, None], maps, report["pixel"]["raw_threshold"])):
        clear = (raw - threshold).abs() > 1e-5
        assert torch.equal(flags[clear], expected[clear])

    image_rate = output.pred_label.float().mean().item()
    expected = report["image"]["expected_fpr"]
    sampling_error = math.sqrt(_beta_sd(report["image"]["rank"], count) ** 2 + expected * (1 - expected) / fresh)
    assert abs(image_rate - expected) < 4 * sampling_error
    assert expected <= 0.05

    per_image = pixel_flags.float().flatten(1).mean(dim=1)
    pixel_error = math.sqrt(report["pixel"]["validation_fpr_se"] ** 2 + per_image.var().item() / fresh)
    assert abs(per_image.mean().item() - 0.01) < 4 * pixel_error
    assert report["pixel"]["validation_fpr_se"] > 0


def test_anomalies_in_validation_give_f1_alongside_but_the_image_threshold_comes_from_normals() -> None:
    generator = torch.Generator().manual_seed(2)
    labels = torch.cat([torch.zeros(200, dtype=torch.bool), torch.ones(50, dtype=torch.bool)])
    scores = torch.randn(250, generator=generator) + 3 * labels
    maps = _correlated_maps(250, generator)
    masks = torch.zeros_like(maps, dtype=torch.bool)
    masks[200:, 8:16, 8:16] = True
    maps = maps + 3 * masks

    anomalib_default = PostProcessor()
    _feed(anomalib_default, scores, maps, labels, masks)
    by_rate = FlowPostProcessor(image_fpr=0.05, pixel_fpr=0.01)
    _feed(by_rate, scores, maps, labels, masks)
    by_default = FlowPostProcessor()
    _feed(by_default, scores, maps, labels, masks)

    f1_image, f1_pixel = float(anomalib_default._image_threshold), float(anomalib_default._pixel_threshold)
    report = by_rate.threshold_report
    assert report["normal_images"] == 200 and report["anomalous_images"] == 50
    assert report["image"]["source"] == "fpr"
    assert report["image"]["f1_threshold"] == pytest.approx(f1_image)
    assert report["pixel"]["f1_threshold"] == pytest.approx(f1_pixel)
    assert report["image"]["raw_threshold"] == false_alarm_threshold(scores[:200], 0.05)[0]
    assert float(by_rate._image_threshold) == pytest.approx(report["image"]["raw_threshold"])
    assert "F1-optimal" in by_rate.summary() and "(not used)" in by_rate.summary()

    # no rate given, anomalies present: both thresholds at the default rates from the normal images (synthetic
    # anomalies are larger than real ones); the F1-optimal ones are reported alongside
    report = by_default.threshold_report
    assert report["image"]["source"] == report["pixel"]["source"] == "fpr_default"
    assert float(by_default._image_threshold) == pytest.approx(false_alarm_threshold(scores[:200], 0.05)[0])
    assert float(by_default._pixel_threshold) == pytest.approx(false_alarm_threshold(maps[:200], 0.001)[0])
    assert report["pixel"]["f1_threshold"] == pytest.approx(f1_pixel)
    # the normalised scale: 0.5 at the threshold, ±1 normal-score std at 0.25 / 0.75
    spread = float(scores[:200].double().std())
    threshold = float(by_default._image_threshold)
    normalised = by_default._normalize(torch.tensor([threshold - spread, threshold, threshold + spread]),
                                       by_default.image_min, by_default.image_max, by_default.image_threshold)
    torch.testing.assert_close(normalised, torch.tensor([0.25, 0.5, 0.75]))


def test_default_with_normal_only_validation_uses_default_rates(caplog: pytest.LogCaptureFixture) -> None:
    generator = torch.Generator().manual_seed(3)
    enough = FlowPostProcessor()
    _feed(enough, torch.randn(60, generator=generator), _correlated_maps(60, generator), torch.zeros(60).bool())
    assert enough.threshold_report["image"]["source"] == "fpr_default"
    assert enough.threshold_report["image"]["fpr"] == 0.05
    assert enough.threshold_report["pixel"]["fpr"] == 0.001

    few = FlowPostProcessor()
    scores = torch.randn(5, generator=generator)
    _feed(few, scores, _correlated_maps(5, generator), torch.zeros(5).bool())
    # too few for an order statistic at 5 %: the Student-t 95 % prediction bound of a normal fitted to them
    # (t₀.₉₅,₄ = 2.1318, × √1.2), with a warning
    report = few.threshold_report["image"]
    assert report["source"] == "fpr_gaussian"
    assert report["raw_threshold"] == pytest.approx(
        float(scores.double().mean() + 2.1318 * 1.2 ** 0.5 * scores.double().std()), abs=1e-3)
    assert "mean + 2.34 std of 5 normal scores" in few.summary()
    few.on_fit_end(None, None)
    assert "rests on only 5 normal validation images" in caplog.text


def test_too_few_normal_images_for_a_requested_rate_says_how_many() -> None:
    generator = torch.Generator().manual_seed(4)
    post_processor = FlowPostProcessor(image_fpr=0.01)
    with pytest.raises(ValueError, match=r"5 held-out normal images, but image_fpr=0\.01 needs ≥ 99"):
        _feed(post_processor, torch.randn(5, generator=generator), _correlated_maps(5, generator),
              torch.zeros(5).bool())
    pixel = FlowPostProcessor(image_fpr=0.2, pixel_fpr=0.001)
    with pytest.raises(ValueError, match=f"pixel_fpr=0.001 needs ≥ {MIN_NORMAL_IMAGES_FOR_PIXEL_FPR}"):
        _feed(pixel, torch.randn(5, generator=generator), _correlated_maps(5, generator), torch.zeros(5).bool())


def _fake_trainer(train_paths: list[str], val_paths: list[str]) -> SimpleNamespace:
    def dataset(paths: list[str]) -> SimpleNamespace:
        return SimpleNamespace(samples=pd.DataFrame({"image_path": paths, "label_index": [0] * len(paths)}))

    return SimpleNamespace(datamodule=SimpleNamespace(train_data=dataset(train_paths), val_data=dataset(val_paths)))


def test_fit_start_refuses_small_or_overlapping_validation_before_training() -> None:
    train = [f"train/{i}.png" for i in range(80)]
    with pytest.raises(ValueError, match="needs ≥ 19"):
        FlowPostProcessor(image_fpr=0.05).on_fit_start(_fake_trainer(train, [f"val/{i}.png" for i in range(10)]), None)
    with pytest.raises(ValueError, match="also training images"):
        FlowPostProcessor(image_fpr=0.05).on_fit_start(_fake_trainer(train, train[:20]), None)
    FlowPostProcessor(image_fpr=0.05).on_fit_start(_fake_trainer(train, [f"val/{i}.png" for i in range(20)]), None)


@pytest.mark.parametrize("value", [0, 1.0, 1.5, -0.1, "0.1", True])
def test_bad_rates_are_refused_by_name(value) -> None:
    with pytest.raises(ValueError, match="image_fpr must be a false-alarm rate in \\(0, 1\\)"):
        FlowPostProcessor(image_fpr=value)


def test_sanity_check_validation_sets_nothing() -> None:
    post_processor = FlowPostProcessor(image_fpr=0.5)
    batch = ImageBatch(image=torch.zeros(4, 3, 8, 8), gt_label=torch.zeros(4).bool(), pred_score=torch.rand(4),
                       anomaly_map=torch.rand(4, 8, 8))
    post_processor.on_validation_batch_end(FITTING, None, batch)
    post_processor.on_validation_epoch_end(SimpleNamespace(sanity_checking=True), None)
    assert torch.isnan(post_processor._image_threshold) and not post_processor.threshold_report


# ------------------------------------------------------------------ end to end on generated images

GENERATED = {"category": "surface", "image_size": 128, "num_train": 100, "num_test_good": 60,
             "num_test_per_defect": 4}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """Tiny FastFlow, 2 epochs on generated images; validation = 20 normal training images only."""
    root = tmp_path_factory.mktemp("thresholds_data")
    datamodule = SyntheticAD(root=root, **GENERATED, train_batch_size=16, eval_batch_size=32,
                             val_split_mode="from_train", val_split_ratio=0.2)
    seed_everything(0)
    model = FastFlow(**TINY_FASTFLOW, pre_processor=FastFlow.configure_pre_processor((128, 128)),
                     post_processor=FlowPostProcessor(image_fpr=0.1, pixel_fpr=0.01))
    engine = Engine(max_epochs=2, accelerator="cpu", devices=1, logger=False, callbacks=[RecordEpochs()],
                    default_root_dir=tmp_path_factory.mktemp("thresholds_run"), enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    predictions = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
    return model, engine, root, predictions


class RecordEpochs(Callback):
    """After each training epoch: the validation metrics logged, the threshold levels, the feature cache's hits."""

    def __init__(self) -> None:
        self.epochs: list[dict] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        cache = pl_module.model.encoder.cache
        self.epochs.append({"metrics": sorted(k for k in trainer.callback_metrics if k.startswith("val_")),
                            "levels": sorted(k for k in ("image", "pixel") if k in pl_module.post_processor
                                             .threshold_report), "hits": cache.hits, "misses": cache.misses})


def test_pixel_validation_work_and_backbone_features_are_spent_once_per_fit(trained) -> None:
    """Earlier validations compute image metrics and the image threshold only; the last one everything. The
    training images' backbone features are computed in the first epoch and reused after it, then freed."""
    model, engine, _, _ = trained
    first, last = next(c for c in engine.trainer.callbacks if isinstance(c, RecordEpochs)).epochs
    assert first["metrics"] == ["val_image_AUROC"] and first["levels"] == ["image"]
    assert last["metrics"] == ["val_image_AUROC", "val_pixel_AUPRO", "val_pixel_AUROC"]
    assert last["levels"] == ["image", "pixel"]
    assert first["hits"] == 0 and first["misses"] == 80  # 80 training images (100 minus 20 held out)
    assert last["misses"] == 80 and last["hits"] >= 80  # epoch 2 and the statistics pass read the cache
    assert len(model.model.encoder.cache) == 0  # freed at the end of the fit


def test_generated_normal_test_images_are_flagged_at_the_requested_rate(trained, capsys) -> None:
    model, _, _, predictions = trained
    report = model.post_processor.threshold_report
    assert report["normal_images"] == 20 and report["anomalous_images"] == 0
    assert report["image"]["rank"] == 2  # ⌊0.1·21⌋: expected rate 2/21
    labels = torch.cat([batch.pred_label.flatten() for batch in predictions]).bool()
    truth = torch.cat([batch.gt_label.flatten() for batch in predictions]).bool()
    good = int((~truth).sum())
    flagged = int(labels[~truth].sum())
    # realised count ~ beta-binomial(good, k, n+1−k): validation sampling error plus test sampling error
    expected = report["image"]["expected_fpr"]
    variance = good * expected * (1 - expected) * (report["normal_images"] + 1 + good) / (report["normal_images"] + 2)
    assert flagged <= good * expected + 3 * math.sqrt(variance)
    assert flagged < good  # normal-only validation does not flag everything
    assert "raw threshold" in model.post_processor.summary()


def test_checkpoint_keeps_rates_and_thresholds(trained, tmp_path: Path) -> None:
    model, engine, _, _ = trained
    path = tmp_path / "fastflow.ckpt"
    engine.trainer.save_checkpoint(path)
    stored = torch.load(path, weights_only=True)["anomalib_post_processor_config"]
    assert stored["image_fpr"] == 0.1 and stored["pixel_fpr"] == 0.01
    restored = FastFlow.load_from_checkpoint(path, weights_only=True)
    assert isinstance(restored.post_processor, FlowPostProcessor)
    assert restored.post_processor.image_fpr == 0.1 and restored.post_processor.pixel_fpr == 0.01
    assert restored.post_processor.threshold_report == model.post_processor.threshold_report
    assert float(restored.post_processor._image_threshold) == float(model.post_processor._image_threshold)
    assert float(restored.post_processor._pixel_threshold) == float(model.post_processor._pixel_threshold)


def test_openvino_export_keeps_the_thresholds(trained, tmp_path: Path) -> None:
    import openvino as ov

    model, *_ = trained
    model.eval()
    xml = model.to_openvino(tmp_path, input_size=(128, 128))
    write_threshold_metadata(xml, model.post_processor)
    metadata = read_threshold_metadata(xml)
    report = model.post_processor.threshold_report
    assert metadata["image_fpr"] == 0.1 and metadata["pixel_fpr"] == 0.01
    assert metadata["image_threshold"] == pytest.approx(report["image"]["raw_threshold"])
    assert metadata["report"] == report

    torch.manual_seed(0)
    images = torch.rand(6, 3, 128, 128)
    with torch.no_grad():
        raw = model.model(model.pre_processor(images))
        expected = model(images)
    # f32: the CPU plugin's default is bf16 on CPUs with bf16 units, which moves scores by ~1e-3
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    outputs = {port.get_any_name(): value for port, value in compiled(images.numpy()).items()}
    # the graph flags exactly what the raw thresholds flag (away from float rounding at the threshold itself)
    threshold = report["image"]["raw_threshold"]
    clear = (raw.pred_score.flatten() - threshold).abs() > 1e-4
    exported_labels = torch.from_numpy(outputs["pred_label"]).flatten().bool()
    assert torch.equal(exported_labels[clear], (raw.pred_score.flatten() > threshold)[clear])
    torch.testing.assert_close(torch.from_numpy(outputs["pred_score"]).flatten(), expected.pred_score.flatten(),
                               atol=1e-4, rtol=0)
    pixel_threshold = report["pixel"]["raw_threshold"]
    raw_map = raw.anomaly_map.reshape(outputs["pred_mask"].shape)
    clear_pixels = (raw_map - pixel_threshold).abs() > 1e-4
    exported_mask = torch.from_numpy(outputs["pred_mask"]).bool()
    # the mask is drawn on the images labelled anomalous only
    flagged = exported_labels.reshape(-1, *[1] * (raw_map.dim() - 1))
    assert torch.equal(exported_mask[clear_pixels], ((raw_map > pixel_threshold) & flagged)[clear_pixels])
    assert not exported_mask[~exported_labels].any()


def test_anomalib_train_cli_takes_the_post_processor_and_its_rates(trained, tmp_path: Path) -> None:
    _, _, root, _ = trained
    command = [
        str(Path(sys.executable).with_name("anomalib")), "train",
        "--model", "flowad_plugins.FastFlow", "--model.backbone", "efficientnet_lite0",
        "--model.layers", "[blocks.1, blocks.2]", "--model.flow_steps", "2",
        "--model.post_processor", "flowad_plugins.post_processing.FlowPostProcessor",
        "--model.post_processor.image_fpr", "0.1", "--model.post_processor.pixel_fpr", "0.01",
        *SYNTHETIC_CLI_DATA, "--data.root", str(root), "--data.num_train", "100", "--data.num_test_good", "60",
        "--data.num_test_per_defect", "4", "--data.val_split_mode", "from_train",
        "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--default_root_dir", str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "FlowPostProcessor thresholds from 20 held-out normal validation images" in output
    assert "image: false-alarm rate 10.000% (requested)" in output
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert checkpoints, "no checkpoint written"
    stored = torch.load(checkpoints[0], weights_only=True)["anomalib_post_processor_config"]
    assert stored["image_fpr"] == 0.1 and stored["threshold_report"]["image"]["source"] == "fpr"

"""FastFlow: exact flow pass and per-position log-det, sizes, ViT path, Engine fit/test, CLI, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from conftest import REPO, fit_and_test, run_anomalib_train

from flowad_plugins import FastFlow
from flowad_plugins.models.common import NonFiniteLossError
from flowad_plugins.models.fastflow import FastFlowModel, default_layers

TINY_FASTFLOW = {"backbone": "efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "flow_steps": 2,
                 "input_size": (128, 128)}


def _randomise(flow: torch.nn.Module) -> None:
    """Move every trainable parameter far from the identity initialisation (permutations stay as built)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in flow.parameters():
            if parameter.requires_grad:
                parameter.copy_(0.3 * torch.randn_like(parameter))


def _engine(tmp_path: Path, epochs: int = 1) -> Engine:
    return Engine(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path,
                  enable_progress_bar=False)


# --- the torch model -----------------------------------------------------------------------------------------


def test_default_layers_follow_the_paper() -> None:
    assert default_layers("resnet18") == ["layer1", "layer2", "layer3"]
    assert default_layers("wide_resnet50_2") == ["layer1", "layer2", "layer3"]
    assert default_layers("efficientnet_lite0") == ["blocks.1", "blocks.2", "blocks.4"]
    assert default_layers("deit_base_distilled_patch16_384") == ["blocks.7"]
    assert default_layers("cait_m48_448") == ["blocks.40"]


@pytest.mark.parametrize("input_size", [(96, 160), (100, 140)])
def test_non_square_input_builds_norms_from_real_feature_shapes(input_size: tuple[int, int]) -> None:
    model = FastFlowModel(**{**TINY_FASTFLOW, "input_size": input_size})
    features = model.encoder(torch.zeros(1, 3, *input_size))
    assert [tuple(norm.normalized_shape) for norm in model.norms] == [tuple(f.shape[1:]) for f in features]
    model.train()
    outputs = model(torch.randn(2, 3, *input_size))
    assert [tuple(log_det.shape) for _, log_det in outputs] == [(2, *f.shape[2:]) for f in features]
    model.eval()
    result = model(torch.randn(2, 3, *input_size))
    assert result.anomaly_map.shape == (2, 1, *input_size) and result.pred_score.shape == (2,)


def test_vision_transformer_path_on_a_tiny_vit() -> None:
    model = FastFlowModel(backbone="test_vit", pre_trained=False, flow_steps=3, hidden_ratio=0.16)
    assert model.input_size == (160, 160)  # the ViT's own size
    assert model.encoder.layers == ["blocks.3"] and model.encoder.final_norm
    assert all(isinstance(norm, torch.nn.Identity) for norm in model.norms)
    model.train()
    ((z, log_det),) = model(torch.randn(2, 3, 160, 160))
    assert z.shape == (2, 64, 10, 10) and log_det.shape == (2, 10, 10)
    model.eval()
    assert model(torch.randn(1, 3, 160, 160)).anomaly_map.shape == (1, 1, 160, 160)
    with pytest.raises(ValueError, match=r"is not accepted.*nearest valid input_size=\(160, 160"):
        FastFlowModel(backbone="test_vit", pre_trained=False, input_size=(224, 224))


def test_vit_lightning_model_gets_a_pre_processor_of_the_vit_size() -> None:
    model = FastFlow(backbone="test_vit", pre_trained=False, flow_steps=2)
    assert tuple(model.input_size) == (160, 160)
    assert model.hparams["input_size"] == [160, 160]


def test_map_log_det_adds_the_per_position_log_det() -> None:
    model = FastFlowModel(**TINY_FASTFLOW).eval()
    assert model.map_log_det  # the default: better localisation on validation data
    z, log_det = torch.randn(2, 8, 3, 5), torch.randn(2, 3, 5)
    model.map_log_det = False
    without = model.log_likelihood_map(z, log_det)
    assert torch.equal(without, model.log_likelihood_map(z, None))
    model.map_log_det = True
    torch.testing.assert_close(model.log_likelihood_map(z, log_det) - without, log_det / 8)
    with pytest.raises(ValueError, match="map_log_det=True needs the per-position log-det"):
        model.log_likelihood_map(z, None)


# --- Lightning / Engine --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path):
    """A FastFlow fitted for 3 epochs on the generated data, with its engine, datamodule and test metrics."""
    from lightning.pytorch import seed_everything

    seed_everything(0)  # before construction: the flows' initial weights are random too, independent of test order
    model = FastFlow(**TINY_FASTFLOW)
    engine, datamodule, metrics = fit_and_test(model, synthetic_root, tmp_path_factory.mktemp("fastflow"))
    return model, engine, datamodule, metrics


def test_fit_and_test_through_engine(trained) -> None:
    model, _, _, metrics = trained
    assert set(metrics) >= {"image_AUROC", "pixel_AUROC", "pixel_AUPRO"}
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    assert bool(model.model.scorer.statistics.fitted)
    assert metrics["pixel_AUROC"] > 0.75


def test_map_of_an_image_does_not_depend_on_its_batch(trained) -> None:
    model, *_ = trained
    model.model.eval()
    images = torch.randn(5, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    together, alone = model.model(images), model.model(images[2:3])
    assert (together.anomaly_map[2] - alone.anomaly_map[0]).abs().max().item() <= 1e-5
    assert abs(together.pred_score[2].item() - alone.pred_score[0].item()) <= 1e-5


def test_checkpoint_round_trip_predicts_identically(trained, tmp_path: Path) -> None:
    model, engine, _, _ = trained
    path = tmp_path / "fastflow.ckpt"
    engine.trainer.save_checkpoint(path)
    restored = FastFlow.load_from_checkpoint(path, weights_only=True)
    restored.eval()
    model.eval()
    images = torch.rand(2, 3, 128, 128)
    expected, actual = model(images), restored(images)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, atol=1e-6, rtol=0)
    torch.testing.assert_close(actual.pred_score, expected.pred_score, atol=1e-6, rtol=0)


def test_pre_processor_replaced_before_fit_rebuilds_the_heads(tiny_datamodule, tmp_path: Path) -> None:
    model = FastFlow(**TINY_FASTFLOW)
    model.pre_processor = model.configure_pre_processor((96, 128))  # as benchmarks/evaluate.py --image-size does
    _engine(tmp_path).fit(model=model, datamodule=tiny_datamodule)
    assert model.model.input_size == (96, 128)
    assert tuple(model.model.norms[0].normalized_shape) == (40, 12, 16)
    with pytest.raises(ValueError, match="differs from the size this trained model was built for"):
        model.model.set_input_size((128, 128))


def test_non_finite_loss_stops_training_with_a_clear_message(tiny_datamodule, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    model = FastFlow(**TINY_FASTFLOW)
    monkeypatch.setattr(model.model, "flow_outputs",
                        lambda images: [(torch.full((len(images), 40, 16, 16), float("nan")),
                                         torch.zeros(len(images), 16, 16))])
    with pytest.raises(NonFiniteLossError, match="Likely causes: learning rate too high"):
        _engine(tmp_path).fit(model=model, datamodule=tiny_datamodule)


# --- errors --------------------------------------------------------------------------------------------------


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match=r"input_size=\(16, 16\) is too small.*nearest valid input_size=\(32, 32\)"):
        FastFlow(**{**TINY_FASTFLOW, "input_size": (16, 16)})
    with pytest.raises(ValueError, match="flow_steps must be positive, got 0"):
        FastFlow(**{**TINY_FASTFLOW, "flow_steps": 0})
    with pytest.raises(ValueError, match="clamp must be positive"):
        FastFlow(**{**TINY_FASTFLOW, "clamp": -1.0})
    with pytest.raises(ValueError, match="hidden_ratio must be positive"):
        FastFlow(**{**TINY_FASTFLOW, "hidden_ratio": 0})
    with pytest.raises(ValueError, match="lr must be positive"):
        FastFlow(**{**TINY_FASTFLOW, "lr": 0})
    with pytest.raises(ValueError, match="Unknown backbone='resnet_nope'"):
        FastFlow(backbone="resnet_nope")
    with pytest.raises(ValueError, match=r"Unknown layers=\['blocks.9'\]"):
        FastFlow(**{**TINY_FASTFLOW, "layers": ["blocks.9"]})
    with pytest.raises(ValueError, match="input_size must be two positive integers"):
        FastFlow(**{**TINY_FASTFLOW, "input_size": (128,)})


def test_images_of_another_size_are_refused() -> None:
    model = FastFlowModel(**TINY_FASTFLOW).eval()
    with pytest.raises(ValueError, match=r"images of size \(128, 96\) do not match input_size=\(128, 128\)"):
        model(torch.randn(1, 3, 128, 96))


# --- CLI -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [None, "configs/fastflow_efficientnet_lite0.yaml"])
def test_anomalib_train_cli_runs_fastflow(synthetic_root: Path, tmp_path: Path, config: str | None) -> None:
    model_args = ["--model", "flowad_plugins.FastFlow", "--model.backbone", "efficientnet_lite0",
                  "--model.layers", "[blocks.2, blocks.4]", "--model.flow_steps", "2"]
    config_args = ["--config", str(REPO / config), "--model.flow_steps", "2"] if config else model_args
    run_anomalib_train(config_args, synthetic_root, tmp_path)

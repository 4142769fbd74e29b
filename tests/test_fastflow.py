"""FastFlow specifics: layers, sizes and their layer norms, ViT path, map log-det, errors.

The contract every model fulfils is in ``test_contract.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from conftest import TINY_CONFIGS

from flowad_plugins import FastFlow
from flowad_plugins.models.fastflow import FastFlowModel, default_layers

TINY_FASTFLOW = {**TINY_CONFIGS["FastFlow"], "input_size": (128, 128)}


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
    assert torch.equal(without, model.log_likelihood_map(z, torch.zeros_like(log_det)))  # the log-det is ignored
    model.map_log_det = True
    torch.testing.assert_close(model.log_likelihood_map(z, log_det) - without, log_det / 8)


# --- Lightning / Engine --------------------------------------------------------------------------------------


def test_pre_processor_replaced_before_fit_rebuilds_the_heads(tiny_datamodule, tmp_path: Path) -> None:
    model = FastFlow(**TINY_FASTFLOW)
    model.pre_processor = model.configure_pre_processor((96, 128))  # as benchmarks/evaluate.py --image-size does
    _engine(tmp_path).fit(model=model, datamodule=tiny_datamodule)
    assert model.model.input_size == (96, 128)
    assert tuple(model.model.norms[0].normalized_shape) == (40, 12, 16)
    assert model.hparams["input_size"] == [96, 128]  # what a checkpoint rebuilds
    with pytest.raises(ValueError, match="differs from the size this trained model was built for"):
        model.model.set_input_size((128, 128))


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
    with pytest.raises(ValueError, match="lr must be a positive number, got 0"):
        FastFlow(**{**TINY_FASTFLOW, "lr": 0})
    with pytest.raises(ValueError, match="weight_decay must be a ≥ 0 number, got 'none'"):
        FastFlow(**{**TINY_FASTFLOW, "weight_decay": "none"})
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


def test_the_image_score_comes_from_the_coarsest_scale() -> None:
    model = FastFlow(**{**TINY_FASTFLOW, "layers": ["blocks.1", "blocks.2"]})
    assert model.model.scorer.score_scales == [1] and model.model.scorer.map_scales == [0, 1]

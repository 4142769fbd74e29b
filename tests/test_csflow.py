"""CSFlow specifics: cross-scale flow invertibility and log-det, input sizes, configs, ONNX, error cases.

The contract every model fulfils is in ``test_contract.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from conftest import REPO, TINY_CONFIGS

from flowad_plugins import CSFlow
from flowad_plugins.flows import CrossScaleFlow, soft_clamp
from flowad_plugins.models.cs_flow import CSFlowModel

# efficientnet_lite0 (offline weights) layer blocks.2 (stride 8, 40 channels): 128 px → 16, 8, 4 positions.
TINY_CSFLOW = {**TINY_CONFIGS["CSFlow"], "kernel_sizes": None, "lr": 1e-3}


def _model(size: tuple[int, int] = (128, 128), **overrides) -> CSFlow:
    return CSFlow(pre_processor=CSFlow.configure_pre_processor(size), **{**TINY_CSFLOW, **overrides})


def _engine(tmp_path: Path, **kwargs) -> Engine:
    return Engine(max_epochs=1, accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path,
                  enable_progress_bar=False, **kwargs)


def _random_flow(**kwargs) -> CrossScaleFlow:
    """A float64 flow with random weights everywhere (its gains start at 0, i.e. at the identity)."""
    flow = CrossScaleFlow(**kwargs).double()
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.copy_(0.2 * torch.randn_like(parameter))
    return flow


def _pyramid(batch: int, channels: int, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    return [torch.randn(batch, channels, h, w, dtype=torch.float64) for h, w in sizes]


# --- the flow -------------------------------------------------------------------------------------------------


def test_soft_clamp_is_bounded_and_near_identity_at_zero() -> None:
    s = torch.linspace(-100, 100, 1001)
    clamped = soft_clamp(s, 3.0)
    assert clamped.abs().max() < 3.0
    torch.testing.assert_close(soft_clamp(torch.tensor([1e-4]), 3.0), torch.tensor([1e-4 * 2 / torch.pi * 1]),
                               rtol=1e-3, atol=0)
    assert bool((clamped[1:] > clamped[:-1]).all())


@pytest.mark.parametrize("sizes", [[(8, 8), (4, 4), (2, 2)], [(7, 5), (4, 3), (2, 2)]])
def test_cross_scale_flow_inverts_exactly(sizes: list[tuple[int, int]]) -> None:
    flow = _random_flow(channels=5, coupling_blocks=4, kernel_sizes=[3, 3, 3, 5], hidden_channels=6)
    xs = _pyramid(3, 5, sizes)
    zs, log_det = flow(xs)
    assert [z.shape for z in zs] == [x.shape for x in xs]
    assert log_det.shape == (3,)
    assert max((z - x).abs().max().item() for z, x in zip(zs, xs, strict=True)) > 1  # far from identity
    for x, x_back in zip(xs, flow.inverse(zs), strict=True):
        torch.testing.assert_close(x_back, x, atol=1e-8, rtol=1e-8)


def test_cross_scale_log_det_matches_autograd_jacobian() -> None:
    flow = _random_flow(channels=3, coupling_blocks=2, kernel_sizes=[3, 5], hidden_channels=4)
    xs = _pyramid(2, 3, [(4, 5), (2, 3), (1, 2)])
    _, log_det = flow(xs)
    sizes = [x[0].numel() for x in xs]
    for i in range(2):

        def flat(vector: torch.Tensor, i: int = i) -> torch.Tensor:
            parts = [p.reshape(1, *x.shape[1:]) for p, x in zip(vector.split(sizes), xs, strict=True)]
            return torch.cat([z.flatten() for z in flow(parts)[0]])

        jacobian = torch.autograd.functional.jacobian(flat, torch.cat([x[i].flatten() for x in xs]))
        assert log_det[i].item() == pytest.approx(torch.linalg.slogdet(jacobian)[1].item(), abs=1e-8)


def test_input_norm_standardises_the_first_batch_and_inverts() -> None:
    flow = CrossScaleFlow(channels=4, hidden_channels=8).double()
    xs = [5 + 3 * x for x in _pyramid(4, 4, [(8, 8), (4, 4), (2, 2)])]
    normalised, log_det = flow.input_norm(xs)  # training mode: the first batch initialises it
    assert bool(flow.input_norm.initialized)
    for x in normalised:
        torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-9, rtol=0)
        torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(4, dtype=torch.float64), atol=1e-9, rtol=0)
    for x, x_back in zip(xs, flow.input_norm.inverse(normalised), strict=True):
        torch.testing.assert_close(x_back, x)
    expected = sum(h * w * flow.input_norm.log_scale[i].sum() for i, (h, w) in enumerate([(8, 8), (4, 4), (2, 2)]))
    torch.testing.assert_close(log_det, expected.expand(4))


def test_cross_scale_flow_starts_at_identity_and_images_are_independent() -> None:
    flow = CrossScaleFlow(channels=4, hidden_channels=8, input_norm=False).double()
    xs = _pyramid(2, 4, [(8, 8), (4, 4), (2, 2)])
    zs, log_det = flow(xs)
    torch.testing.assert_close(log_det, torch.zeros(2, dtype=torch.float64))
    # the identity up to the fixed channel permutations
    assert sorted(zs[0][0, :, 0, 0].tolist()) == pytest.approx(sorted(xs[0][0, :, 0, 0].tolist()))
    flow = _random_flow(channels=4, hidden_channels=8)
    together, _ = flow(xs)
    alone, _ = flow([x[1:] for x in xs])
    for z_together, z_alone in zip(together, alone, strict=True):
        torch.testing.assert_close(z_together[1:], z_alone)


def test_cross_scale_flow_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"kernel_sizes=\[3, 4\] must list one odd positive kernel size"):
        CrossScaleFlow(channels=4, coupling_blocks=2, kernel_sizes=[3, 4])
    with pytest.raises(ValueError, match=r"kernel_sizes=\[3\] .*coupling_blocks=2"):
        CrossScaleFlow(channels=4, coupling_blocks=2, kernel_sizes=[3])
    with pytest.raises(ValueError, match="channels must be an integer ≥ 2, got 1"):
        CrossScaleFlow(channels=1)
    with pytest.raises(ValueError, match="clamp_alpha must be positive"):
        CrossScaleFlow(channels=4, clamp_alpha=0)
    with pytest.raises(ValueError, match="Expected 3 maps"):
        CrossScaleFlow(channels=4)([torch.randn(1, 4, 4, 4)] * 2)


# --- the torch model --------------------------------------------------------------------------------------------


def test_torch_model_accepts_odd_but_valid_sizes() -> None:
    model = CSFlowModel(**{k: v for k, v in TINY_CSFLOW.items() if k != "lr"}).eval()
    assert model.size_multiple == 32  # stride 8 × 4
    for height, width in [(96, 160), (224, 32)]:  # multiples of 32, not of 64 or 128
        output = model(torch.rand(2, 3, height, width))
        assert output.anomaly_map.shape == (2, 1, height, width)
        assert output.pred_score.shape == (2,)
        assert bool(torch.isfinite(output.anomaly_map).all())
    model.train()
    latents, log_det = model(torch.rand(1, 3, 96, 160))
    assert [tuple(z.shape[-2:]) for z in latents] == [(12, 20), (6, 10), (3, 5)]
    assert log_det.shape == (1,)


def test_torch_model_refuses_sizes_not_divisible_by_stride_times_four() -> None:
    model = CSFlowModel(**{k: v for k, v in TINY_CSFLOW.items() if k != "lr"}).eval()
    with pytest.raises(ValueError, match=r"input_size=\(100, 128\).*multiples of 32.*Nearest valid sizes: \[96, 128\]"):
        model(torch.rand(1, 3, 100, 128))
    with pytest.raises(ValueError, match=r"input_size=\(250, 250\)"):
        _model((250, 250))


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match=r"lr_schedule='step' is not supported; allowed values: \['constant'"):
        _model(lr_schedule="step")
    with pytest.raises(ValueError, match="lr must be a positive number, got 0"):
        _model(lr=0)
    with pytest.raises(ValueError, match="lr must be a positive number, got '4e-3'"):
        _model(lr="4e-3")  # YAML 1.1 reads 4e-3 as a string
    with pytest.raises(ValueError, match="gradient_clip_norm must be a ≥ 0 number, got -1"):
        _model(gradient_clip_norm=-1)
    with pytest.raises(ValueError, match="layer must be one backbone layer name"):
        _model(layer=["blocks.2", "blocks.4"])
    with pytest.raises(ValueError, match=r"Unknown layer=.blocks.9. for backbone"):
        _model(layer="blocks.9")
    with pytest.raises(ValueError, match="num_scales must be an integer ≥ 2"):
        _model(num_scales=1)


def test_trainer_arguments_clip_the_gradient_norm() -> None:
    model = _model(gradient_clip_norm=0.5)
    assert model.trainer_arguments["gradient_clip_val"] == 0.5
    assert model.trainer_arguments["gradient_clip_algorithm"] == "norm"


# --- configs and export ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("csflow_*.yaml")))
def test_configs_name_valid_arguments(config: str) -> None:
    import inspect

    import yaml

    settings = yaml.safe_load((REPO / "configs" / config).read_text())
    assert settings["model"]["class_path"] == "flowad_plugins.CSFlow"
    init = dict(settings["model"]["init_args"])
    assert set(init) <= set(inspect.signature(CSFlow).parameters)
    assert init["kernel_sizes"] == [3, 3, 3, 5]
    assert (init["weight_decay"], init["gradient_clip_norm"]) == (1e-5, 1.0)
    if "paper" in config:
        assert (init["lr"], init["lr_schedule"], init["hidden_channels"]) == (2e-4, "constant", 1024)
    init.pop("pre_processor", None)
    if init["backbone"] == "efficientnet_lite0":  # offline weights: build it (the paper model is ~460 M parameters)
        assert CSFlow(**init).model.flow.kernel_sizes == [3, 3, 3, 5]


def test_torch_model_exports_to_onnx(tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime

    model = CSFlowModel(**{k: v for k, v in TINY_CSFLOW.items() if k != "lr"}).eval()
    images = torch.rand(2, 3, 96, 160)
    path = tmp_path / "csflow.onnx"
    torch.onnx.export(model, (images,), str(path), input_names=["input"], output_names=["pred_score", "anomaly_map"],
                      dynamo=False, opset_version=17)
    pred_score, anomaly_map = onnxruntime.InferenceSession(str(path)).run(None, {"input": images.numpy()})
    expected = model(images)
    np.testing.assert_allclose(pred_score, expected.pred_score.numpy(), atol=1e-4)
    np.testing.assert_allclose(anomaly_map, expected.anomaly_map.numpy(), atol=1e-4)

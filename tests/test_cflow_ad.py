"""CflowAD specifics: chunked and pass-wise inference, the condition cache, fiber sampling, error cases.

The contract every model fulfils (fit/test/predict, batch independence, checkpoints, export, CLI, non-finite
loss) is in ``test_contract.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from conftest import TINY_CFLOW

from flowad_plugins import CflowAD
from flowad_plugins.inference_passes import images_per_pass


def _model(**overrides) -> CflowAD:
    return CflowAD(pre_processor=CflowAD.configure_pre_processor((128, 128)), **{**TINY_CFLOW, **overrides})


def _moved_model() -> CflowAD:
    """A tiny CflowAD whose decoders are moved away from their initialisation (not an identity-like flow)."""
    torch.manual_seed(0)
    model = _model()
    with torch.no_grad():
        for parameter in model.model.decoders.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def _engine(tmp_path: Path, **kwargs) -> Engine:
    return Engine(max_epochs=1, accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path,
                  enable_progress_bar=False, **kwargs)


def test_chunked_inference_equals_one_pass() -> None:
    model = _moved_model()
    model.model.eval()
    images = torch.randn(3, 3, 128, 128)
    one_pass = model.model(images).anomaly_map
    model.model.inference_chunk_size = 7
    try:
        chunked = model.model(images).anomaly_map
    finally:
        model.model.inference_chunk_size = 65536
    torch.testing.assert_close(chunked, one_pass, atol=1e-5, rtol=0)


def test_eval_batches_run_in_passes_of_whole_images_with_the_same_outputs() -> None:
    model = _moved_model()
    torch_model = model.model.eval()
    torch.manual_seed(0)
    images = torch.randn(5, 3, 128, 128)
    calls = []
    hook = torch_model.encoder.register_forward_hook(lambda _module, inputs, _output: calls.append(len(inputs[0])))
    default = torch_model.inference_pass_pixels
    try:
        torch_model.inference_pass_pixels = 0  # one pass
        one_pass = torch_model(images)
        torch_model.inference_pass_pixels = 2 * 128 * 128
        in_passes = torch_model(images)
    finally:
        torch_model.inference_pass_pixels = default
        hook.remove()
    assert calls == [5, 2, 2, 1]
    # same values up to float32 rounding (the untrained map reaches ~35, where one ulp is 4e-6; BLAS may split
    # products differently for other batch sizes when it runs on several threads)
    torch.testing.assert_close(in_passes.anomaly_map, one_pass.anomaly_map, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(in_passes.pred_score, one_pass.pred_score, atol=1e-5, rtol=1e-6)
    assert in_passes.pred_label is None and in_passes.pred_mask is None
    assert images_per_pass((128, 128), 2 * 128 * 128 + 5) == 2
    assert images_per_pass((640, 640), 4 * 256 * 256) == 1  # at least one image


def test_input_size_too_small_is_refused(tiny_datamodule, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"input_size=\(16, 16\) is too small"):
        CflowAD(pre_processor=CflowAD.configure_pre_processor((16, 16)), **TINY_CFLOW)
    model = _model()
    model.pre_processor = CflowAD.configure_pre_processor((16, 16))  # replaced after construction: refused at fit
    with pytest.raises(ValueError, match=r"input_size=\(16, 16\) is too small"):
        _engine(tmp_path).fit(model=model, datamodule=tiny_datamodule)


def test_too_few_training_images_are_refused(tmp_path: Path) -> None:
    from flowad_plugins.data import SyntheticAD

    datamodule = SyntheticAD(root=tmp_path / "few", image_size=64, num_train=4, num_test_good=1, num_test_per_defect=1,
                             val_split_ratio=0.25)
    with pytest.raises(ValueError, match="Too few training images: got 3"):
        _engine(tmp_path).fit(model=_model(), datamodule=datamodule)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="fiber_batch_size must be"):
        _model(fiber_batch_size=0)
    with pytest.raises(ValueError, match="condition_dim must be a positive multiple of 4"):
        _model(condition_dim=10)
    with pytest.raises(ValueError, match="Unknown layers"):
        _model(layers=["blocks.9"])
    with pytest.raises(ValueError, match=r"lr must be a positive number, got -0\.001"):
        _model(lr=-1e-3)


def test_inference_cache_follows_parameter_updates() -> None:
    model = CflowAD(**TINY_CFLOW).model.eval()
    images = torch.randn(2, 3, 64, 64)
    before = model(images).anomaly_map
    with torch.no_grad():
        for parameter in model.decoders.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05)
    cached = model(images).anomaly_map
    model._condition_cache.clear()
    fresh = model(images).anomaly_map
    assert not torch.allclose(before, cached)
    torch.testing.assert_close(cached, fresh)


def test_fibers_keep_each_fiber_with_its_position() -> None:
    model = CflowAD(**TINY_CFLOW).model
    features = torch.randn(2, 40, 4, 5)
    fibers, positions = model.fibers(features)
    assert fibers.shape == (40, 40) and torch.equal(positions[:20], torch.arange(20))
    for row, (fiber, position) in enumerate(zip(fibers, positions, strict=True)):
        torch.testing.assert_close(fiber, features[row // 20, :, position // 5, position % 5])

"""The score map's per-position statistics are fitted once per fit on the training images, live in the checkpoint, and
give the same scores alone or in a batch, in torch and in the exported ONNX graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MODEL_NAMES, fit_and_test, tiny_model


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_position_statistics_are_fitted_saved_and_exported(name: str, synthetic_root: Path, tmp_path: Path) -> None:
    import onnxruntime

    import flowad_plugins

    model = tiny_model(name, (96, 96))
    engine, _, metrics = fit_and_test(model, synthetic_root, tmp_path, epochs=2)
    statistics = model.model.scorer.positions
    assert statistics.fitted and tuple(statistics.mean.shape) == (96, 96)
    assert bool((statistics.std > 0).all()) and {"image_AUROC", "pixel_AUROC"} <= set(metrics)
    torch.manual_seed(0)
    images = torch.rand(3, 3, 96, 96)
    model.eval()
    with torch.no_grad():
        together, alone = model(images), model(images[1:2])
        inputs = model.pre_processor(images)
        scorer = model.model.scorer
        plain = scorer._resample.blur(scorer.score_map(model.model.likelihood_maps(inputs), (96, 96)),
                                      scorer.score_blur_sigma).flatten(1).amax(dim=1)
    torch.testing.assert_close(together.pred_score[1:2], alone.pred_score, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model.model(inputs).pred_score, plain)  # the statistics are in use
    checkpoint = tmp_path / "position.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    restored = getattr(flowad_plugins, name).load_from_checkpoint(checkpoint, weights_only=True).eval()
    torch.testing.assert_close(restored.model.scorer.positions.std, statistics.std)
    with torch.no_grad():
        torch.testing.assert_close(restored(images).pred_score, together.pred_score)
    onnx_path = model.to_onnx(tmp_path / "onnx", input_size=(96, 96))
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": images.numpy()}),
                       strict=True))
    np.testing.assert_allclose(np.asarray(outputs["pred_score"]).reshape(-1), together.pred_score.numpy(),
                               atol=1e-4)

"""``position_score``: the score map's per-position statistics are fitted once per fit on the training images, live
in the checkpoint, and give the same scores alone or in a batch, in torch and in the exported ONNX graph."""

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

    model = tiny_model(name, (96, 96), position_score=True)
    engine, _, metrics = fit_and_test(model, synthetic_root, tmp_path, epochs=2)
    statistics = model.model.scorer.map_statistics
    assert statistics.fitted and tuple(statistics.map_mean.shape) == (96, 96)
    assert bool((statistics.map_std > 0).all()) and {"image_AUROC", "pixel_AUROC"} <= set(metrics)
    torch.manual_seed(0)
    images = torch.rand(3, 3, 96, 96)
    model.eval()
    with torch.no_grad():
        together, alone = model(images), model(images[1:2])
        with model.model.scorer.plain_score_maps():
            plain = model(images)
    torch.testing.assert_close(together.pred_score[1:2], alone.pred_score, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together.pred_score, plain.pred_score)  # the statistics are in use
    checkpoint = tmp_path / "position.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    restored = getattr(flowad_plugins, name).load_from_checkpoint(checkpoint, weights_only=True).eval()
    torch.testing.assert_close(restored.model.scorer.map_statistics.map_std, statistics.map_std)
    with torch.no_grad():
        torch.testing.assert_close(restored(images).pred_score, together.pred_score)
    onnx_path = model.to_onnx(tmp_path / "onnx", input_size=(96, 96))
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": images.numpy()}),
                       strict=True))
    np.testing.assert_allclose(np.asarray(outputs["pred_score"]).reshape(-1), together.pred_score.numpy(),
                               atol=1e-4)



def test_the_shift_tolerant_candidate_forgives_a_moved_structure_but_not_a_defect() -> None:
    import sys

    from flowad_plugins.position_statistics import ScoreMapStatistics

    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.append(benchmarks)
    from select_image_score import shift_tolerant_standardised

    torch.manual_seed(0)
    normals = 0.1 * torch.randn(40, 64, 64)
    normals[:, 20:24, 30:34] += 5.0  # a structure every normal image has at the same place
    statistics = ScoreMapStatistics()
    statistics.fit([normals])
    moved, defective = 0.1 * torch.randn(1, 64, 64), 0.1 * torch.randn(1, 64, 64)
    moved[:, 20:24, 34:38] += 5.0  # the same structure, 4 px (1/16 of the side) to the right
    defective[:, 20:24, 30:34] += 5.0
    defective[:, 44:47, 10:13] += 5.0  # and a defect where no normal image has anything
    both = torch.cat([moved, defective])
    strict = statistics.standardise(both[:, None]).flatten(1).amax(dim=1)
    tolerant = shift_tolerant_standardised(statistics, both, 1 / 16).flatten(1).amax(dim=1)
    assert strict[0] > 10 and tolerant[0] < 6  # the moved structure: unusual in place, usual 4 px away
    assert tolerant[1] > 20  # the defect is unusual at every nearby position


def test_the_shrunk_candidate_spans_per_position_to_mean_subtracted_standardisation() -> None:
    import sys

    from flowad_plugins.position_statistics import ScoreMapStatistics

    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.append(benchmarks)
    from select_image_score import shrunk_standardised

    torch.manual_seed(0)
    normals = 0.1 * torch.randn(40, 32, 32)
    normals[:, 4:6, 4:6] *= 0.01  # a place the flow has learnt by heart: almost no spread on its training images
    statistics = ScoreMapStatistics()
    statistics.fit([normals])
    unseen = 0.1 * torch.randn(2, 32, 32)
    unseen[:, 4:6, 4:6] = 0.1  # an unseen normal image varies there as much as anywhere (one σ of the others)
    unseen[1, 20:22, 20:22] += 1.0  # and a defect elsewhere
    plain = statistics.standardise(unseen[:, None])[:, 0]
    torch.testing.assert_close(shrunk_standardised(statistics, unseen, 0.0), plain)
    shrunk = shrunk_standardised(statistics, unseen, 2.0).flatten(1).amax(dim=1)
    peak = int(plain[1].flatten().argmax())
    assert 4 <= peak // 32 < 6 and 4 <= peak % 32 < 6  # plain: the learnt place outranks the defect
    assert shrunk[1] > 2 * shrunk[0]  # shrunk, the defect decides
    ranking = (unseen - statistics.map_mean).flatten().argsort()
    torch.testing.assert_close(shrunk_standardised(statistics, unseen, 1e9).flatten().argsort(), ranking)

"""Scoring: train-statistics normalisation, batch independence, rank-preserving post-processing."""

from __future__ import annotations

import pytest
import torch

from flowad_plugins.post_processing import FlowPostProcessor
from flowad_plugins.scoring import AnomalyScorer, LikelihoodStatistics, gaussian_log_likelihood


def test_gaussian_log_likelihood_is_the_standard_normal_density_per_dimension() -> None:
    z = torch.randn(10, 3)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1) / 3
    torch.testing.assert_close(gaussian_log_likelihood(z, torch.zeros(10)), expected)


def test_statistics_accumulate_then_commit_mean_and_std() -> None:
    stats = LikelihoodStatistics(num_scales=2)
    values = torch.randn(1000) * 3 + 5
    stats.update(0, values[:400])
    stats.update(0, values[400:])
    stats.update(1, torch.ones(10))
    assert not bool(stats.fitted)
    stats.commit()
    assert bool(stats.fitted)
    assert abs(stats.mean[0].item() - values.double().mean().item()) < 1e-4
    assert abs(stats.std[0].item() - values.double().std(unbiased=False).item()) < 1e-3
    assert stats.mean[1].item() == 1.0


def test_scorer_standardises_upsamples_and_takes_the_max() -> None:
    scorer = AnomalyScorer(num_scales=2)
    scorer.statistics.mean.copy_(torch.tensor([1.0, -1.0]))
    scorer.statistics.std.copy_(torch.tensor([2.0, 0.5]))
    maps = [torch.full((2, 4, 4), 1.0), torch.full((2, 2, 2), -2.0)]
    maps[0][1, 0, 0] = -9.0  # one low-likelihood position in image 1
    output = scorer(maps, (8, 8))
    assert output.anomaly_map.shape == (2, 1, 8, 8)
    # image 0: scale 0 → 0, scale 1 → (−1 − (−2))/0.5 = 2, mean 1 everywhere
    torch.testing.assert_close(output.anomaly_map[0], torch.ones(1, 8, 8))
    assert output.pred_score[1] > output.pred_score[0] == 1.0


def test_post_processor_normalisation_is_strictly_increasing_without_ties() -> None:
    scores = torch.tensor([-1e4, -50.0, -1.0, 0.0, 0.4, 0.5, 0.6, 1.0, 50.0, 1e4])
    normalized = FlowPostProcessor._normalize(scores, torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.5))
    assert torch.all(normalized[1:] > normalized[:-1])
    assert torch.all((normalized > 0) & (normalized < 1))
    assert normalized[5].item() == 0.5


def test_smoothing_changes_the_map_but_not_the_image_score() -> None:
    maps = [torch.randn(2, 8, 8), torch.randn(2, 4, 4)]
    sharp, smooth = AnomalyScorer(2, blur_sigma=0.0), AnomalyScorer(2, blur_sigma=2.0)
    sharp_out, smooth_out = sharp(maps, (32, 32)), smooth(maps, (32, 32))
    torch.testing.assert_close(smooth_out.pred_score, sharp_out.pred_score)
    assert not torch.allclose(smooth_out.anomaly_map, sharp_out.anomaly_map)
    assert smooth_out.anomaly_map.shape == (2, 1, 32, 32)


def test_separable_blur_equals_anomalibs_2d_gaussian() -> None:
    from anomalib.models.components import GaussianBlur2d

    from flowad_plugins.scoring import SeparableGaussianBlur

    maps = torch.rand(2, 1, 40, 48)
    torch.testing.assert_close(SeparableGaussianBlur(3.0)(maps), GaussianBlur2d(sigma=3.0, channels=1)(maps),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(40, 48), (5, 7), (1, 9)])
def test_blur_matrix_pass_equals_convolution_pass(size: tuple[int, int]) -> None:
    """The cached-matrix (eager) and convolution (export) passes agree, also when the kernel is truncated."""
    from flowad_plugins.scoring import SeparableGaussianBlur

    maps = torch.rand(3, 1, *size)
    blur = SeparableGaussianBlur(3.0)
    by_matrix = blur(maps)
    blur.MAX_MATRIX_SIZE = 0
    torch.testing.assert_close(by_matrix, blur(maps), atol=1e-6, rtol=1e-5)


def test_likelihood_aggregation_is_the_papers_sum_relative_to_training_mean() -> None:
    """``−log Σ_l up(exp(log p_l − μ_l))``: one scale without smoothing gives ``μ − log p`` exactly; batch-free."""
    from flowad_plugins.scoring import AnomalyScorer

    torch.manual_seed(0)
    scorer = AnomalyScorer(num_scales=2, aggregation="likelihood")
    for scale, values in enumerate((torch.randn(64) - 1, torch.randn(64) * 2 - 3)):
        scorer.statistics.update(scale, values)
    scorer.statistics.commit()
    fine, coarse = torch.randn(3, 8, 8) - 1, torch.randn(3, 4, 4) - 3
    output = scorer([fine, coarse], (8, 8))
    mean = scorer.statistics.mean
    upsampled = torch.nn.functional.interpolate((coarse - mean[1]).exp()[:, None], size=(8, 8), mode="bilinear")
    expected = -((fine - mean[0]).exp()[:, None] + upsampled).log()
    torch.testing.assert_close(output.anomaly_map, expected)
    torch.testing.assert_close(output.pred_score, expected.flatten(1).amax(1))
    alone = scorer([fine[:1], coarse[:1]], (8, 8))
    torch.testing.assert_close(alone.anomaly_map, output.anomaly_map[:1])

    single = AnomalyScorer(num_scales=1, aggregation="likelihood")
    single.statistics.update(0, torch.randn(32))
    single.statistics.commit()
    torch.testing.assert_close(single([fine], (8, 8)).anomaly_map[:, 0], single.statistics.mean[0] - fine)
    with pytest.raises(ValueError, match="aggregation must be one of"):
        AnomalyScorer(num_scales=1, aggregation="max")


@pytest.mark.parametrize("aggregation", ["standardized", "likelihood"])
def test_map_scales_restrict_the_map_not_the_score(aggregation: str) -> None:
    from flowad_plugins.scoring import AnomalyScorer

    torch.manual_seed(0)
    maps = [torch.randn(2, 8, 8), torch.randn(2, 4, 4), torch.randn(2, 2, 2)]
    every, finest = AnomalyScorer(3, aggregation=aggregation), AnomalyScorer(3, aggregation=aggregation,
                                                                             map_scales=[0])
    only_finest = AnomalyScorer(1, aggregation=aggregation)
    out_every, out_finest = every(maps, (16, 16)), finest(maps, (16, 16))
    torch.testing.assert_close(out_finest.pred_score, out_every.pred_score)
    torch.testing.assert_close(out_finest.anomaly_map, only_finest(maps[:1], (16, 16)).anomaly_map)
    assert AnomalyScorer(3, map_scales=[2, 1, 0]).map_scales is None
    with pytest.raises(ValueError, match="map_scales must be a non-empty subset of \\[0, 1, 2\\]"):
        AnomalyScorer(3, map_scales=[3])


@pytest.mark.parametrize("aggregation", ["standardized", "likelihood"])
@pytest.mark.parametrize("blur_sigma", [0.0, 4.0])
def test_score_scales_restrict_the_score_not_the_map(aggregation: str, blur_sigma: float) -> None:
    """``score_scales=[-1]``: the image score is the coarsest scale's maximum (also once standardised per
    position), while the map keeps every scale; ``plain_score_maps`` yields the map the score is taken from."""
    torch.manual_seed(0)
    maps = [torch.randn(2, 8, 8), torch.randn(2, 4, 4), torch.randn(2, 2, 2)]
    every = AnomalyScorer(3, aggregation=aggregation, blur_sigma=blur_sigma)
    coarsest = AnomalyScorer(3, aggregation=aggregation, blur_sigma=blur_sigma, score_scales=[-1])
    only_coarsest = AnomalyScorer(1, aggregation=aggregation)
    out_every, out_coarsest = every(maps, (16, 16)), coarsest(maps, (16, 16))
    torch.testing.assert_close(out_coarsest.anomaly_map, out_every.anomaly_map)
    alone = only_coarsest(maps[2:], (16, 16))
    torch.testing.assert_close(out_coarsest.pred_score, alone.pred_score)
    assert not torch.allclose(out_coarsest.pred_score, out_every.pred_score)
    with coarsest.plain_score_maps():
        score_map = coarsest(maps, (16, 16)).anomaly_map
    torch.testing.assert_close(score_map, alone.anomaly_map)

    coarsest.position_score = True
    coarsest.map_statistics.fit([torch.randn(4, 1, 16, 16)])
    expected = coarsest.map_statistics.standardise(alone.anomaly_map).flatten(1).amax(dim=1)
    torch.testing.assert_close(coarsest(maps, (16, 16)).pred_score, expected)
    assert coarsest.score_scales == [2]
    assert AnomalyScorer(3, score_scales=[0, 1, 2]).score_scales is None
    with pytest.raises(ValueError, match="score_scales must be a non-empty subset of \\[0, 1, 2\\], got \\[-4\\]"):
        AnomalyScorer(3, score_scales=[-4])


@pytest.mark.parametrize("aggregation", ["standardized", "likelihood"])
@pytest.mark.parametrize("blur_sigma", [0.0, 2.0, 3.0])
def test_score_blur_is_the_maximum_of_the_smoothed_unsmoothed_map(aggregation: str, blur_sigma: float) -> None:
    """``score_blur_sigma`` σ: the score is the maximum of the every-scale map before the map's own blur, smoothed
    by σ in the map's domain; a lone hot pixel then weighs less than a blob of the same height."""
    from flowad_plugins.scoring import SeparableGaussianBlur

    torch.manual_seed(0)
    maps = [torch.randn(3, 8, 8), torch.randn(3, 4, 4)]
    plain = AnomalyScorer(2, aggregation=aggregation)(maps, (32, 32))
    scorer = AnomalyScorer(2, aggregation=aggregation, blur_sigma=blur_sigma, score_blur_sigma=3.0)
    output = scorer(maps, (32, 32))
    expected = SeparableGaussianBlur(3.0)(plain.anomaly_map).flatten(1).amax(dim=1)
    torch.testing.assert_close(output.pred_score, expected, rtol=1e-4, atol=1e-4)
    if blur_sigma == 0:
        torch.testing.assert_close(output.anomaly_map, plain.anomaly_map)
    assert scorer.score_blur_sigma == 3.0
    with pytest.raises(ValueError, match="score_blur_sigma must be ≥ 0"):
        AnomalyScorer(2, score_blur_sigma=-1.0)


def test_score_blur_ranks_a_blob_above_a_lone_pixel_of_the_same_height() -> None:
    scorer = AnomalyScorer(1, score_blur_sigma=2.0)
    maps = [torch.zeros(2, 32, 32)]
    maps[0][0, 16, 16] = -10.0  # image 0: one low-likelihood position
    maps[0][1, 12:20, 12:20] = -10.0  # image 1: a defect of 8×8 positions, same depth
    output = scorer(maps, (32, 32))
    assert output.pred_score[1] > 2 * output.pred_score[0]
    assert AnomalyScorer(1)(maps, (32, 32)).pred_score.unique().numel() == 1  # the plain maximum ties them


def test_score_map_statistics_fit_per_position_and_restore_any_shape() -> None:
    from flowad_plugins.position_statistics import ScoreMapStatistics

    torch.manual_seed(0)
    first, second = torch.randn(4, 1, 6, 5) * 2 + 1, torch.randn(3, 1, 6, 5) * 2 + 1
    stats = ScoreMapStatistics()
    assert not stats.fitted
    stats.fit([first, second])
    together = torch.cat([first, second])[:, 0].double()
    torch.testing.assert_close(stats.map_mean, together.mean(dim=0).float())
    torch.testing.assert_close(stats.map_std, together.std(dim=0, correction=0).float())
    restored = ScoreMapStatistics()
    restored.load_state_dict(stats.state_dict())  # the buffers take the checkpoint's shapes
    torch.testing.assert_close(restored.map_std, stats.map_std)
    restored.load_state_dict({})  # a checkpoint from before these statistics: loads, without them
    assert not restored.fitted


def test_position_score_cancels_a_place_that_is_unusual_on_every_normal_image() -> None:
    """A border row that is always low-likelihood on normal images decides the plain maximum, not the position
    score; a real defect in the interior still does. The map itself is unchanged."""
    torch.manual_seed(0)
    normal = torch.randn(64, 8, 8) * 0.1
    normal[:, 0, :] -= 5.0  # the top row: low likelihood on every normal image (a border artefact)
    scorer = AnomalyScorer(1, position_score=True)
    with scorer.plain_score_maps():
        plain_maps = scorer([normal], (8, 8)).anomaly_map
    scorer.map_statistics.fit([plain_maps])
    border_only, defect = normal[:1].clone(), normal[1:2].clone()
    defect[0, 4, 4] -= 3.0
    images = [torch.cat([border_only, defect])]
    plain = AnomalyScorer(1)(images, (8, 8))
    assert plain.pred_score[0] > 0.9 * plain.pred_score[1]  # the border dominates the plain maximum
    output = scorer(images, (8, 8))
    assert output.pred_score[1] > 5 * output.pred_score[0]
    torch.testing.assert_close(output.anomaly_map, plain.anomaly_map)
    stretched = scorer([torch.nn.functional.interpolate(images[0][:, None], size=(16, 16))[:, 0]], (16, 16))
    assert stretched.pred_score[1] > stretched.pred_score[0]  # statistics follow another map size

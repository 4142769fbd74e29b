"""Scoring: likelihood, resampling, normal-data statistics and the score head (``flowad_plugins.scoring``)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from flowad_plugins.post_processing import FlowPostProcessor
from flowad_plugins.scoring import AnomalyScorer, LikelihoodStatistics, gaussian_log_likelihood
from flowad_plugins.scoring.resampling import MapResampler, bilinear_matrix


def fitted_scorer(num_scales: int, aggregation: str, **kwargs) -> AnomalyScorer:
    """A scorer whose per-scale statistics are fitted on random normal values."""
    scorer = AnomalyScorer(num_scales, aggregation=aggregation, **kwargs)
    scorer.statistics.update_all([torch.randn(64) - scale for scale in range(num_scales)])
    scorer.statistics.commit()
    return scorer


def test_gaussian_log_likelihood_is_the_standard_normal_density_per_dimension() -> None:
    z = torch.randn(10, 3)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1) / 3
    torch.testing.assert_close(gaussian_log_likelihood(z, torch.zeros(10)), expected)


def test_likelihood_statistics_accumulate_then_commit_mean_and_std() -> None:
    stats = LikelihoodStatistics(num_scales=2)
    values = torch.randn(1000) * 3 + 5
    stats.update_all([values[:400], None])
    stats.update_all([values[400:], torch.ones(10)])
    assert not bool(stats.fitted)
    stats.commit()
    assert bool(stats.fitted)
    assert abs(stats.mean[0].item() - values.double().mean().item()) < 1e-4
    assert abs(stats.std[0].item() - values.double().std(unbiased=False).item()) < 1e-3
    assert stats.mean[1].item() == 1.0
    with pytest.raises(ValueError, match="Expected log-likelihoods for 2 scales"):
        stats.update_all([values])


@pytest.mark.parametrize(("source", "target"), [(8, 64), (5, 37), (16, 16), (32, 20)])
def test_bilinear_matrix_equals_interpolate(source: int, target: int) -> None:
    values = torch.randn(3, source, dtype=torch.float64)
    expected = F.interpolate(values.unsqueeze(0), size=target, mode="linear", align_corners=False)[0]
    torch.testing.assert_close(values @ torch.as_tensor(bilinear_matrix(source, target)).T, expected)


@pytest.mark.parametrize("sigma", [2.0, 4.0])
def test_resampling_equals_interpolate_then_anomalibs_gaussian_blur(sigma: float) -> None:
    from anomalib.models.components import GaussianBlur2d

    maps = [torch.randn(2, 8, 6), torch.randn(2, 4, 3)]
    size = (48, 40)
    upsampled = sum(F.interpolate(m.unsqueeze(1), size=size, mode="bilinear", align_corners=False) for m in maps)
    expected = GaussianBlur2d(sigma=sigma, channels=1)(upsampled)
    resample = MapResampler()
    torch.testing.assert_close(resample(maps, size, sigma), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(resample(maps, size, sigma, weights=[0.5, 0.5]), 0.5 * expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(resample.blur(upsampled, sigma), expected, atol=1e-5, rtol=1e-5)


def test_standardized_scorer_standardises_upsamples_and_averages() -> None:
    scorer = AnomalyScorer(num_scales=2, aggregation="standardized")
    scorer.statistics.mean.copy_(torch.tensor([1.0, -1.0]))
    scorer.statistics.std.copy_(torch.tensor([2.0, 0.5]))
    maps = [torch.full((2, 4, 4), 1.0), torch.full((2, 2, 2), -2.0)]
    maps[0][1, 0, 0] = -9.0  # one low-likelihood position in image 1
    output = scorer(maps, (8, 8))
    assert output.anomaly_map.shape == (2, 1, 8, 8)
    # image 0: scale 0 → 0, scale 1 → (−1 − (−2))/0.5 = 2, mean 1 everywhere
    torch.testing.assert_close(output.anomaly_map[0], torch.ones(1, 8, 8))
    assert output.pred_score[1] > output.pred_score[0] == 1.0


def test_likelihood_aggregation_is_the_papers_sum_relative_to_training_mean() -> None:
    """``−log Σ_l up(exp(log p_l − μ_l))``; one scale without smoothing gives ``μ − log p`` exactly; batch-free."""
    torch.manual_seed(0)
    scorer = fitted_scorer(2, "likelihood")
    fine, coarse = torch.randn(3, 8, 8) - 1, torch.randn(3, 4, 4) - 3
    output = scorer([fine, coarse], (8, 8))
    mean = scorer.statistics.mean
    upsampled = F.interpolate((coarse - mean[1]).exp()[:, None], size=(8, 8), mode="bilinear")
    expected = -((fine - mean[0]).exp()[:, None] + upsampled).log()
    torch.testing.assert_close(output.anomaly_map, expected)
    torch.testing.assert_close(output.pred_score, expected.flatten(1).amax(1))  # positions not fitted: plain max
    alone = scorer([fine[:1], coarse[:1]], (8, 8))
    torch.testing.assert_close(alone.anomaly_map, output.anomaly_map[:1])
    single = fitted_scorer(1, "likelihood")
    torch.testing.assert_close(single([fine], (8, 8)).anomaly_map[:, 0], single.statistics.mean[0] - fine)
    with pytest.raises(ValueError, match="aggregation must be one of"):
        AnomalyScorer(num_scales=1, aggregation="max")


@pytest.mark.parametrize("aggregation", ["standardized", "likelihood"])
def test_map_and_score_scales_and_smoothing_each_touch_only_their_own_output(aggregation: str) -> None:
    torch.manual_seed(0)
    maps = [torch.randn(2, 8, 8), torch.randn(2, 4, 4), torch.randn(2, 2, 2)]
    every = fitted_scorer(3, aggregation)
    coarsest = fitted_scorer(3, aggregation, score_scales=[-1], blur_sigma=4.0)
    coarsest.statistics.load_state_dict(every.statistics.state_dict())
    only_coarsest = AnomalyScorer(1, aggregation=aggregation)
    only_coarsest.statistics.mean.copy_(every.statistics.mean[2:])
    only_coarsest.statistics.std.copy_(every.statistics.std[2:])
    out_every, out_coarsest = every(maps, (16, 16)), coarsest(maps, (16, 16))
    torch.testing.assert_close(out_coarsest.pred_score, only_coarsest(maps[2:], (16, 16)).pred_score)
    torch.testing.assert_close(coarsest.score_map(maps, (16, 16)), only_coarsest(maps[2:], (16, 16)).anomaly_map)
    if aggregation == "likelihood":  # smoothed in the probability domain, as the papers combine scales
        expected = -MapResampler().blur((-out_every.anomaly_map).exp(), 4.0).log()
    else:
        expected = MapResampler().blur(out_every.anomaly_map, 4.0)
    torch.testing.assert_close(out_coarsest.anomaly_map, expected, atol=1e-4, rtol=1e-4)
    assert coarsest.score_scales == [2] and every.map_scales == [0, 1, 2]
    with pytest.raises(ValueError, match=r"score_scales must be a non-empty subset of \[0, 1, 2\]"):
        AnomalyScorer(3, aggregation=aggregation, score_scales=[-4])
    with pytest.raises(ValueError, match="score_blur_sigma must be ≥ 0"):
        AnomalyScorer(2, aggregation=aggregation, score_blur_sigma=-1.0)


def test_score_blur_ranks_a_blob_above_a_lone_pixel_of_the_same_height() -> None:
    scorer = AnomalyScorer(1, aggregation="standardized", score_blur_sigma=2.0)
    maps = [torch.zeros(2, 32, 32)]
    maps[0][0, 16, 16] = -10.0  # image 0: one low-likelihood position
    maps[0][1, 12:20, 12:20] = -10.0  # image 1: a defect of 8×8 positions, same depth
    assert scorer(maps, (32, 32)).pred_score[1] > 2 * scorer(maps, (32, 32)).pred_score[0]
    assert AnomalyScorer(1, aggregation="standardized")(maps, (32, 32)).pred_score.unique().numel() == 1


def test_post_processor_normalisation_is_strictly_increasing_without_ties() -> None:
    scores = torch.tensor([-1e4, -50.0, -1.0, 0.0, 0.4, 0.5, 0.6, 1.0, 50.0, 1e4])
    normalized = FlowPostProcessor._normalize(scores, torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.5))
    assert torch.all(normalized[1:] > normalized[:-1])
    assert torch.all((normalized > 0) & (normalized < 1))
    assert normalized[5].item() == 0.5

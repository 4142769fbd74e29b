"""Likelihood → anomaly map and image score, with statistics of normal training data (shared by the three models)."""

from .likelihood import gaussian_log_likelihood
from .scorer import AnomalyScorer
from .statistics import (
    LikelihoodStatistics,
    NormalStatisticsLifeCycle,
    is_last_validation_of_fit,
)

__all__ = [
    "AnomalyScorer",
    "LikelihoodStatistics",
    "NormalStatisticsLifeCycle",
    "gaussian_log_likelihood",
    "is_last_validation_of_fit",
]

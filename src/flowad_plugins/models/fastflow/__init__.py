"""FastFlow: 2D normalizing flows on backbone feature maps (Yu et al. 2021)."""

from .lightning_model import FastFlow
from .torch_model import FastFlowModel, default_layers

__all__ = ["FastFlow", "FastFlowModel", "default_layers"]

"""CS-Flow: fully convolutional cross-scale normalizing flows (Rudolph et al., WACV 2022)."""

from .lightning_model import CSFlow
from .torch_model import CSFlowModel

__all__ = ["CSFlow", "CSFlowModel"]

"""CFLOW-AD: conditional normalizing flows on feature fibers with 2D positional encoding (WACV 2022)."""

from .lightning_model import CflowAD
from .torch_model import CflowADModel

__all__ = ["CflowAD", "CflowADModel"]

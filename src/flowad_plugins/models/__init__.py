"""The three flow models; each folder holds ``torch_model.py`` (nn.Module) and ``lightning_model.py``."""

from .cflow_ad import CflowAD
from .cs_flow import CSFlow
from .fastflow import FastFlow

__all__ = ["CSFlow", "CflowAD", "FastFlow"]

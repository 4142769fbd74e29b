"""The three flow models; each folder holds ``torch_model.py`` (nn.Module) and ``lightning_model.py``."""

from .cflow_ad import CflowAD

__all__ = ["CflowAD"]

"""flowad-plugins: normalizing-flow anomaly detectors (CFLOW-AD, FastFlow, CS-Flow) for anomalib 2.x.

``anomalib train --model flowad_plugins.CflowAD --data anomalib.data.MVTecAD`` or, in Python,
``Engine().fit(flowad_plugins.CflowAD(...), datamodule=...)``.

The model classes are imported on first access (PEP 562), so ``import flowad_plugins.edge`` (the torch-free
OpenVINO runtime) does not import torch or anomalib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flowad_plugins.cli_errors import install_compact_errors
from flowad_plugins.console import install_console_filters

if TYPE_CHECKING:
    from flowad_plugins.models import CflowAD, CSFlow, FastFlow

__all__ = ["CSFlow", "CflowAD", "FastFlow"]
__version__ = "0.1.0"
install_console_filters()  # known library noise only (flowad_plugins.console); FLOWAD_VERBOSE=1 keeps all
install_compact_errors()  # under the anomalib CLI: user errors in a few lines (flowad_plugins.cli_errors)

_LAZY_ATTRIBUTES = {"CflowAD": "flowad_plugins.models", "CSFlow": "flowad_plugins.models",
                    "FastFlow": "flowad_plugins.models"}


def __getattr__(name: str) -> Any:
    """Import a model class from ``flowad_plugins.models`` when it is first used."""
    if name in _LAZY_ATTRIBUTES:
        value = getattr(importlib.import_module(_LAZY_ATTRIBUTES[name]), name)
        globals()[name] = value
        return value
    msg = f"module 'flowad_plugins' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

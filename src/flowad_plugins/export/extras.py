"""Optional dependencies of the INT8 paths (nncf) and ONNX Runtime, imported on first use with a clear error."""

from __future__ import annotations

import importlib
from types import ModuleType

INT8_EXTRA = "pip install 'flowad-plugins[int8]'"


def require(module_name: str, purpose: str) -> ModuleType:
    """Import ``module_name`` (``"nncf"``, ``"onnxruntime"``), or ``ImportError`` saying how to install it."""
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        msg = f"{purpose} needs the optional package {module_name!r}, which is not installed: {INT8_EXTRA}."
        raise ImportError(msg) from error

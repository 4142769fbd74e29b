"""Optional dependencies, imported on first use with a clear error: nncf (INT8 paths, extra ``int8``) and matplotlib
(overlay colours, extra ``bench``)."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module_name: str, purpose: str, extra: str = "int8") -> ModuleType:
    """Import ``module_name`` (``"nncf"``, ``"matplotlib"``), or ``ImportError`` saying how to install it."""
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        msg = (f"{purpose} needs the optional package {module_name!r}, which is not installed: "
               f"pip install 'flowad-plugins[{extra}]'.")
        raise ImportError(msg) from error

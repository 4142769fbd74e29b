"""Whether the model is being captured as a graph (ONNX export, ``torch.export``, tracing, ``torch.compile``).

Eager-only shortcuts (caches, data-dependent checks, shape-specialised fast paths) are skipped while capturing, so
an exported graph stays general (dynamic batch) and never bakes in a cached tensor.
"""

from __future__ import annotations

import torch


def is_exporting() -> bool:
    """True inside ONNX export, ``torch.jit`` tracing, ``torch.export`` or ``torch.compile``."""
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_compiling()

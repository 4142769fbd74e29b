"""Whether the model is being captured as a graph (ONNX export, ``torch.export``, tracing, ``torch.compile``).

A branch on it is kept only for correctness (caches that must not leak into a graph, Python checks on tensor values
or sizes, batch splitting that would fix a dynamic batch) or for a measured gain, each with a comment saying which.
"""

from __future__ import annotations

import torch


def is_exporting() -> bool:
    """True inside ONNX export, ``torch.jit`` tracing, ``torch.export`` or ``torch.compile``."""
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_compiling()

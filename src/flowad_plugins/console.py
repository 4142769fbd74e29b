"""Console hygiene: drop known, harmless library messages; keep progress bars, results and real warnings.

``install_console_filters()`` runs when ``flowad_plugins`` is imported (as ``anomalib train --model
flowad_plugins.CflowAD`` does) and from ``flowad-demo``. Each filter names one library message by a regular
expression (Lightning tips and notes, deprecation notices from timm/anomalib/torch imports, the ONNX exporter's
opset and version-converter notices, ``onnx_ir`` / ``onnxscript`` INFO bookkeeping); everything else passes.
``drop_duplicate_handlers`` removes the ``RichHandler`` where anomalib's ``configure_logger`` also gave a logger a
plain ``StreamHandler`` (every record printed twice). anomalib's CLI prints two FutureWarnings while importing its
model zoo, before any plugin loads; only ``PYTHONWARNINGS=ignore::FutureWarning`` hides those.

Set ``FLOWAD_VERBOSE=1`` to keep every message. No torch or anomalib import here.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

# Loggers that Lightning's rank_zero_info may write to (the module-level logger is reassigned on import).
_RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
)
_LIGHTNING_INFO_NOISE = (
    r"Tip: For seamless cloud (logging|uploads)",
    r"callbacks returned in `LightningModule\.configure_callbacks` will override",
    r"Loading `train_dataloader` to estimate number of stepping batches",
)
KNOWN_LOG_NOISE: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(_RANK_ZERO_LOGGERS, _LIGHTNING_INFO_NOISE),
    "onnxscript.version_converter": (
        r"model version conversion is not supported by the onnxscript version converter",
        r"Failed to convert the model to the target version \d+ using the ONNX C API",
    ),
    "torch.onnx._internal.exporter._compat": (r"Setting ONNX exporter to use operator set version",),
}
KNOWN_WARNINGS: tuple[str, ...] = (
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"Trying to infer the `batch_size` from an ambiguous collection",
    r"Importing from timm\.models\.layers is deprecated",
    r"The anomalib\.models\.components\.dinov2 package is deprecated",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
# Libraries whose INFO records are graph-pass bookkeeping; raised to WARNING (their children inherit it).
QUIET_INFO_LOGGERS: tuple[str, ...] = ("onnx_ir", "onnxscript")
# Loggers that anomalib's configure_logger gives both a StreamHandler and a RichHandler.
DOUBLE_HANDLER_LOGGERS: tuple[str, ...] = ("", "lightning.pytorch")


class MessageFilter(logging.Filter):
    """Drop log records whose formatted message matches any of ``patterns`` (``re.search``)."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{pattern})" for pattern in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep the record unless its message is known noise."""
        return self.pattern.search(record.getMessage()) is None


def drop_duplicate_handlers(logger_names: tuple[str, ...] = DOUBLE_HANDLER_LOGGERS) -> int:
    """Remove the ``RichHandler`` of each named logger that also has a plain ``StreamHandler`` (each record would
    print twice); returns how many were removed."""
    removed = 0
    for name in logger_names:
        logger = logging.getLogger(name)
        plain = [handler for handler in logger.handlers if type(handler) is logging.StreamHandler]
        rich = [handler for handler in logger.handlers if type(handler).__name__ == "RichHandler"]
        if plain and rich:
            for handler in rich:
                logger.removeHandler(handler)
                removed += 1
    return removed


_installed = False


def install_console_filters(force: bool = False) -> bool:
    """Install the filters once (``force``: again, e.g. after ``warnings.resetwarnings``); returns whether it did.
    Does nothing when the environment sets ``FLOWAD_VERBOSE`` to anything but ``""``/``"0"``."""
    global _installed
    if (_installed and not force) or os.environ.get("FLOWAD_VERBOSE", "0") not in ("", "0"):
        return False
    for name, patterns in KNOWN_LOG_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, MessageFilter) for existing in logger.filters):
            logger.addFilter(MessageFilter(patterns))
    for name in QUIET_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:  # a level the user set stays
            logger.setLevel(logging.WARNING)
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{pattern}")
    drop_duplicate_handlers()
    _installed = True
    return True

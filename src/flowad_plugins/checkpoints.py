"""Reading checkpoint and weight files with ``weights_only=True`` and errors that say what is wrong with the file
(instead of ``torch.load``'s bare ``EOFError`` / ``UnpicklingError`` or Lightning's ``KeyError``).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

LIGHTNING_CHECKPOINT_KEYS = ("state_dict", "pytorch-lightning_version")
MODEL_CLASS_KEY = "flowad_model_class"  # the flow model class that wrote a checkpoint


class CheckpointFileError(ValueError):
    """A checkpoint or weights file is missing, empty, not written by ``torch.save``, or not what was expected."""


def read_checkpoint(
    path: str | Path,
    parameter: str = "checkpoint_path",
    required_keys: Sequence[str] = (),
    safe_globals: Sequence[Any] = (),
) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on CPU (memory-mapped when the file allows it), as a dict.

    ``CheckpointFileError`` naming ``parameter`` (the argument that gave ``path``) when the file is missing, a folder,
    empty, not a torch file, holds non-tensor objects, is not a dict or lacks ``required_keys``. ``safe_globals``:
    extra types ``weights_only`` unpickling allows (anomalib's enums in checkpoints).
    """
    path = Path(path).expanduser()
    where = f"{parameter}={str(path)!r}"
    if not path.exists():
        msg = f"{where} does not exist."
        raise CheckpointFileError(msg)
    if not path.is_file():
        msg = f"{where} is not a file (a folder?); pass the checkpoint file itself (…/model.ckpt)."
        raise CheckpointFileError(msg)
    if path.stat().st_size == 0:
        msg = f"{where} is empty (0 bytes): the save or copy that wrote it was interrupted; use another checkpoint."
        raise CheckpointFileError(msg)
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        unsupported = re.search(r"Unsupported global: GLOBAL \S+", str(error))
        if unsupported is None:  # not a pickle at all
            msg = f"{where} could not be read as a torch checkpoint: it is not a file written by torch.save."
        else:
            msg = (f"{where} holds Python objects besides tensors and plain data, which weights_only loading refuses "
                   f"({unsupported.group(0)}). Re-save it as a state dict (torch.save(model.state_dict(), path)).")
        raise CheckpointFileError(msg) from error
    except Exception as error:  # EOFError, KeyError (legacy format), RuntimeError (bad zip), …
        msg = (f"{where} could not be read as a torch checkpoint ({type(error).__name__}: {str(error)[:200]}); "
               "the file is truncated or not written by torch.save.")
        raise CheckpointFileError(msg) from error
    if not isinstance(loaded, dict):
        msg = f"{where} holds a {type(loaded).__name__}, not a dict of tensors or a checkpoint."
        raise CheckpointFileError(msg)
    missing = [key for key in required_keys if key not in loaded]
    if missing:
        found = sorted(str(key) for key in loaded)[:6]
        msg = (f"{where} is a torch file but not a Lightning checkpoint: it lacks {missing} (top-level keys: "
               f"{found}{'…' if len(loaded) > 6 else ''}). Pass a .ckpt written by anomalib training.")
        raise CheckpointFileError(msg)
    return loaded


def check_lightning_checkpoint(path: Any, parameter: str = "checkpoint_path", model_class: str | None = None) -> None:
    """Raise ``CheckpointFileError`` unless ``path`` is a readable Lightning checkpoint (file-like objects pass),
    written by ``model_class`` when given and the checkpoint records its class."""
    if not isinstance(path, str | Path):
        return
    from anomalib.utils.serialization import ANOMALIB_SAFE_GLOBALS, NUMPY_SAFE_GLOBALS

    checkpoint = read_checkpoint(path, parameter, LIGHTNING_CHECKPOINT_KEYS,
                                 [*ANOMALIB_SAFE_GLOBALS, *NUMPY_SAFE_GLOBALS])
    written_by = checkpoint.get(MODEL_CLASS_KEY) if isinstance(checkpoint, dict) else None
    if model_class is not None and written_by is not None and written_by != model_class:
        msg = (f"{parameter}={str(path)!r} was written by {written_by}, not {model_class}: load it with "
               f"{written_by}.load_from_checkpoint (CLI: --model flowad_plugins.{written_by}).")
        raise CheckpointFileError(msg)


# hyper-parameters that are objects (or carry no shape): not compared
_UNCOMPARED = {"pre_processor", "post_processor", "evaluator", "visualizer", "seed"}


def check_checkpoint_matches(module: torch.nn.Module, checkpoint: dict[str, Any]) -> None:
    """Raise ``CheckpointFileError`` naming the cause when ``checkpoint``'s weights cannot load into ``module``.

    A checkpoint of another model class names that class; one of the same class trained with other shape-setting
    arguments names the arguments and both values. Differences that leave every weight shape alone pass.
    """
    stored = checkpoint.get("state_dict", {})
    expected = module.state_dict()
    mismatched = sorted(key for key in set(stored) | set(expected)
                        if key not in stored or key not in expected
                        or tuple(stored[key].shape) != tuple(expected[key].shape))
    if not mismatched:
        return
    ours = type(module).__name__
    theirs = checkpoint.get(MODEL_CLASS_KEY)
    if theirs is not None and theirs != ours:
        msg = (f"This checkpoint was written by {theirs}, not {ours}: load it with {theirs}.load_from_checkpoint "
               f"(CLI: --model flowad_plugins.{theirs}).")
        raise CheckpointFileError(msg)
    stored_hparams = checkpoint.get("hyper_parameters", {})
    current = dict(getattr(module, "hparams", {}))
    differences = [f"{name}={stored_hparams[name]!r} in the checkpoint, {current[name]!r} here"
                   for name in sorted(set(stored_hparams) & set(current) - _UNCOMPARED)
                   if stored_hparams[name] != current[name]]
    if set(stored_hparams) and not set(stored_hparams) & set(current) - _UNCOMPARED:
        differences = ["its hyper-parameters belong to another model class"]
    hint = "; ".join(differences) if differences else "no hyper-parameter explains it"
    msg = (f"The checkpoint's weights do not fit this {ours} ({len(mismatched)} tensors differ, e.g. "
           f"{mismatched[0]}): {hint}. Build the model with the arguments it was trained with, or leave the "
           "shape-setting --model.* arguments out.")
    raise CheckpointFileError(msg)

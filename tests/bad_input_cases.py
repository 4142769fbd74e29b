"""Bad inputs and the rule each must meet; run by ``test_bad_inputs.py``, which also writes ``docs/bad_inputs.md``.

A case is a function of a ``BadInputWorkspace`` (one tiny trained FastFlow, its checkpoint and exported graphs,
shared by all cases). Rules: ``error`` (raises, the message names every word in ``names``), ``handled`` (runs;
returns what it observed) and ``anomalous`` (returns the predicted labels of the bad images: all must be True,
never "normal").
"""

from __future__ import annotations

import io
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGE_SIZE = 64
TINY_FASTFLOW = {"backbone": "efficientnet_lite0", "layers": ["blocks.2"], "flow_steps": 2,
                 "input_size": (IMAGE_SIZE, IMAGE_SIZE)}


@dataclass(frozen=True)
class Case:
    name: str
    given: str
    rule: str  # "error" | "handled" | "anomalous"
    run: Callable[[Any], Any]
    names: tuple[str, ...] = ()

    @property
    def rule_text(self) -> str:
        if self.rule == "error":
            return "clear error naming " + ", ".join(f"`{name}`" for name in self.names)
        return {"handled": "handled (runs, finite score)", "anomalous": "flagged anomalous (never normal)"}[self.rule]


CASES: list[Case] = []


def case(name: str, given: str, rule: str, names: tuple[str, ...] = ()) -> Callable:
    """Register the decorated function as a case."""

    def register(function: Callable[[Any], Any]) -> Callable[[Any], Any]:
        CASES.append(Case(name, given, rule, function, names))
        return function

    return register


def fastflow(**overrides: Any):
    from flowad_plugins import FastFlow

    return FastFlow(**{**TINY_FASTFLOW, **overrides})


def write_image(path: Path, array: np.ndarray, **save_kwargs: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save_kwargs)
    return path


def rgb(height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> np.ndarray:
    """A smooth generated RGB image, ``H×W×3`` uint8."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)),
                     np.full_like(x, 128)], axis=-1).astype(np.uint8)


def predicted(workspace: Any, folder: Path) -> str:
    """``Engine.predict`` of the trained model over ``folder``; what came out, in words."""
    batches = workspace.predict(folder)
    scores = torch.cat([batch.pred_score.flatten() for batch in batches])
    labels = torch.cat([batch.pred_label.flatten() for batch in batches])
    assert bool(torch.isfinite(scores).all()), f"non-finite scores {scores.tolist()}"
    return f"predicted {len(scores)} image(s), finite scores, labels {['anomalous' if x else 'normal' for x in labels]}"


# ------------------------------------------------------------------------------------ construction and arguments


@case("unknown_backbone", "`FastFlow(backbone='resnet_nonexistent')`", "error", ("backbone",))
def unknown_backbone(_: Any) -> None:
    fastflow(backbone="resnet_nonexistent")


@case("unknown_layer", "`FastFlow(layers=['blocks.9'])` on efficientnet_lite0", "error", ("layers", "blocks.9"))
def unknown_layer(_: Any) -> None:
    fastflow(layers=["blocks.9"])


@case("misspelt_python_argument", "`FastFlow(flow_stepz=2)`", "error", ("flow_stepz",))
def misspelt_python_argument(_: Any) -> None:
    fastflow(flow_stepz=2)


def run_cli(args: list[str]) -> None:
    """``AnomalibCLI(args)`` in this process, without running; a parser error is re-raised with its message."""
    from anomalib.cli import AnomalibCLI

    errors = io.StringIO()
    try:
        with redirect_stderr(errors), redirect_stdout(io.StringIO()):
            AnomalibCLI(args, run=False)
    except SystemExit as error:
        lines = [line.strip() for line in errors.getvalue().splitlines() if line.strip()]
        error_lines = [line for line in lines if line.startswith("error:")] + lines[-4:]
        raise ValueError(" / ".join(error_lines) or f"exit {error.code}") from None


CLI_MODEL = ["--model", "flowad_plugins.FastFlow", "--model.backbone", "efficientnet_lite0"]
CLI_DATA = ["--data", "flowad_plugins.data.SyntheticAD"]


@case("misspelt_cli_argument", "`anomalib train --model flowad_plugins.FastFlow --model.flow_stepz 2`", "error",
      ("flow_stepz",))
def misspelt_cli_argument(_: Any) -> None:
    run_cli(["train", *CLI_MODEL, "--model.flow_stepz", "2", *CLI_DATA])


@case("cli_argument_wrong_type", "`--model.flow_steps two`", "error", ("flow_steps",))
def cli_argument_wrong_type(_: Any) -> None:
    run_cli(["train", *CLI_MODEL, "--model.flow_steps", "two", *CLI_DATA])


@case("misspelt_cli_model", "`--model flowad_plugins.FastFlo`", "error", ("FastFlo",))
def misspelt_cli_model(_: Any) -> None:
    run_cli(["train", "--model", "flowad_plugins.FastFlo", *CLI_DATA])


@case("negative_lr", "`FastFlow(lr=-1)`", "error", ("lr",))
def negative_lr(_: Any) -> None:
    fastflow(lr=-1.0)


@case("zero_fiber_batch", "`CflowAD(fiber_batch_size=0)`", "error", ("fiber_batch_size",))
def zero_fiber_batch(_: Any) -> None:
    from flowad_plugins import CflowAD

    CflowAD(backbone="efficientnet_lite0", layers=["blocks.2"], coupling_blocks=1, fiber_batch_size=0)


@case("unknown_lr_schedule", "`CSFlow(lr_schedule='step')`", "error", ("lr_schedule",))
def unknown_lr_schedule(_: Any) -> None:
    from flowad_plugins import CSFlow

    CSFlow(layer="blocks.2", coupling_blocks=1, hidden_channels=8, lr_schedule="step")


@case("input_16px", "`FastFlow(layers=['blocks.2', 'blocks.4'], input_size=(16, 16))` (stride 16)", "error",
      ("input_size",))
def input_16px(_: Any) -> None:
    fastflow(layers=["blocks.2", "blocks.4"], input_size=(16, 16))


@case("input_size_one_number", "`FastFlow(input_size=(64,))`", "error", ("input_size",))
def input_size_one_number(_: Any) -> None:
    fastflow(input_size=(64,))


@case("missing_backbone_weights", "`backbone_weights='missing.pth'`", "error", ("backbone_weights",))
def missing_backbone_weights(workspace: Any) -> None:
    fastflow(backbone_weights=workspace.path("missing.pth"))


@case("backbone_weights_not_a_state_dict", "`backbone_weights` = a text file", "error", ("backbone_weights",))
def backbone_weights_not_a_state_dict(workspace: Any) -> None:
    path = workspace.path("weights.pth")
    path.write_text("not weights")
    fastflow(backbone_weights=path)


# ---------------------------------------------------------------------------------------------- checkpoints


def load(path: Path) -> Any:
    from flowad_plugins import FastFlow

    return FastFlow.load_from_checkpoint(path)


@case("empty_checkpoint", "0-byte `model.ckpt` to `load_from_checkpoint`", "error", ("checkpoint", "empty"))
def empty_checkpoint(workspace: Any) -> None:
    path = workspace.path("zero.ckpt")
    path.write_bytes(b"")
    load(path)


@case("truncated_checkpoint", "first half of a real checkpoint", "error", ("checkpoint",))
def truncated_checkpoint(workspace: Any) -> None:
    data = workspace.checkpoint.read_bytes()
    path = workspace.path("half.ckpt")
    path.write_bytes(data[: len(data) // 2])
    load(path)


class _Payload:
    """Unpickling this writes a marker file: the proof that a checkpoint ran code."""

    marker = Path()

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.marker, "code ran"))


@case("pickle_payload_checkpoint", "a checkpoint whose pickle runs code when loaded", "error",
      ("checkpoint",))
def pickle_payload_checkpoint(workspace: Any) -> None:
    path, marker = workspace.path("p.ckpt"), workspace.path("marker.txt")
    _Payload.marker = marker
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.0", "payload": _Payload()}, path)
    try:
        load(path)
    finally:
        assert not marker.exists(), "loading the checkpoint executed its pickled code"


@case("state_dict_as_checkpoint", "a plain `torch.save(model.state_dict())` file", "error",
      ("checkpoint",))
def state_dict_as_checkpoint(workspace: Any) -> None:
    path = workspace.path("plain.ckpt")
    torch.save(workspace.model.state_dict(), path)
    load(path)


@case("other_models_checkpoint", "a FastFlow checkpoint to `CflowAD.load_from_checkpoint`", "error", ("FastFlow",))
def other_models_checkpoint(workspace: Any) -> None:
    from flowad_plugins import CflowAD

    CflowAD.load_from_checkpoint(workspace.checkpoint)


@case("wrong_model_size_for_checkpoint", "`--model.flow_steps 3` with a `flow_steps=2` checkpoint (`Engine.test`)",
      "error", ("flow_steps",))
def wrong_model_size_for_checkpoint(workspace: Any) -> None:
    workspace.engine().test(model=fastflow(flow_steps=3), datamodule=workspace.datamodule(),
                            ckpt_path=workspace.checkpoint, verbose=False)

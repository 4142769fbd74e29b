"""Every bad input meets its rule (clear error naming the parameter / handled / flagged anomalous).

``FLOWAD_WRITE_BAD_INPUTS=1 pytest tests/test_bad_inputs.py`` also writes ``docs/bad_inputs.md``, the table of
cases with what was observed; without it the test only checks that the committed table lists every case.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Any

import bad_input_images  # noqa: F401  (registers its cases)
import pytest
from bad_input_cases import CASES, IMAGE_SIZE, TINY_FASTFLOW, Case, fastflow
from conftest import REPO

TABLE = REPO / "docs" / "bad_inputs.md"
WRITE_TABLE = os.environ.get("FLOWAD_WRITE_BAD_INPUTS") == "1"
# cases that do not meet their rule yet: name -> who is fixing what
KNOWN_FAILING: dict[str, str] = {
    "corrupt_png_in_folder": "anomalib's own PredictDataset stops at the first unreadable file without naming it; "
                             "the README's predict command uses PredictFolder, which skips and names it",
}
RESULTS: dict[str, tuple[str, bool]] = {}


class BadInputWorkspace:
    """One tiny FastFlow trained for 1 epoch on generated 64-px data, its checkpoint and exports, and a scratch dir."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str) -> Path:
        """``name`` in the cases' scratch folder (which exists)."""
        (self.root / "cases").mkdir(exist_ok=True)
        return self.root / "cases" / name

    def datamodule(self):
        from flowad_plugins.data import SyntheticAD

        return SyntheticAD(root=self.root / "data", image_size=IMAGE_SIZE, num_train=12, num_test_good=3,
                           num_test_per_defect=2, train_batch_size=4, eval_batch_size=4)

    def engine(self):
        from anomalib.engine import Engine

        return Engine(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      default_root_dir=self.root / "runs")

    @cached_property
    def _trained(self) -> tuple[Any, Path]:
        from lightning.pytorch import seed_everything

        seed_everything(0)
        model, engine = fastflow(), self.engine()
        engine.fit(model=model, datamodule=self.datamodule())
        return model.eval(), Path(engine.trainer.checkpoint_callback.best_model_path)

    @property
    def model(self) -> Any:
        return self._trained[0]

    @property
    def checkpoint(self) -> Path:
        return self._trained[1]

    @cached_property
    def onnx_path(self) -> Path:
        return Path(self.model.to_onnx(self.root / "onnx", input_size=(IMAGE_SIZE, IMAGE_SIZE)))

    @cached_property
    def openvino_path(self) -> Path:
        return Path(self.model.to_openvino(self.root / "openvino", input_size=(IMAGE_SIZE, IMAGE_SIZE)))

    def predict(self, folder: Path) -> list:
        batches = self.engine().predict(model=self.model, data_path=folder, return_predictions=True)
        self.model.eval()
        return batches


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> BadInputWorkspace:
    return BadInputWorkspace(tmp_path_factory.mktemp("bad_inputs"))


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


def run_case(case: Case, workspace: BadInputWorkspace) -> tuple[str, bool]:
    """(observed outcome, whether it meets the case's rule)."""
    try:
        returned = case.run(workspace)
    except AssertionError as error:  # a case's own check failed (e.g. non-finite score, code ran)
        return f"check failed: {first_line(error)}", False
    except Exception as error:  # any exception is an outcome to record
        observed = first_line(error)
        message = " ".join([str(error), *(str(note) for note in getattr(error, "__notes__", []))]).lower()
        return observed, case.rule == "error" and all(name.lower() in message for name in case.names)
    if case.rule == "anomalous":
        pairs = list(returned)
        observed = ", ".join(f"score {score:.3g} → {'anomalous' if label else 'normal'}" for score, label in pairs)
        return observed, bool(pairs) and all(label for _, label in pairs)
    if case.rule == "error":
        return f"no error ({returned or 'returned normally'})", False
    return str(returned or "ran"), True


def case_params() -> list:
    return [pytest.param(case, id=case.name, marks=[pytest.mark.xfail(strict=False, reason=KNOWN_FAILING[case.name])]
                         if case.name in KNOWN_FAILING else []) for case in CASES]


@pytest.mark.parametrize("case", case_params())
def test_bad_input_meets_its_rule(case: Case, workspace: BadInputWorkspace) -> None:
    observed, passed = run_case(case, workspace)
    RESULTS[case.name] = (observed, passed)
    assert passed, f"{case.name}: rule {case.rule_text!r}, observed {observed!r}"


def sanitised(text: str) -> str:
    """``text`` without machine paths, newlines or table separators."""
    for root, token in ((tempfile.gettempdir(), "<tmp>"), (str(REPO), "<repo>"), (sys.prefix, "<venv>"),
                        (str(Path.home()), "~")):
        text = text.replace(root, token)
    text = re.sub(r"<tmp>/\S*?(bad_inputs\d*/)", "<tmp>/", text)
    return text.replace("|", "\\|").replace("\n", " ")[:300]


def table(results: dict[str, tuple[str, bool]]) -> str:
    header = ["# Bad inputs", "",
              "Generated by `FLOWAD_WRITE_BAD_INPUTS=1 pytest tests/test_bad_inputs.py` (tiny FastFlow "
              f"{TINY_FASTFLOW['backbone']}, {IMAGE_SIZE}×{IMAGE_SIZE}, 1 epoch, on generated data). The test asserts "
              "each rule; *observed* is the first line of the error or what the run produced.", "",
              "| Case | Input | Rule | Observed | Meets rule |", "|---|---|---|---|---|"]
    rows = [f"| `{case.name}` | {sanitised(case.given)} | {case.rule_text} | {sanitised(results[case.name][0])} | "
            f"{'yes' if results[case.name][1] else 'NO'} |" for case in CASES]
    return "\n".join([*header, *rows, ""])


def committed_case_names() -> list[str]:
    return re.findall(r"^\| `([a-z0-9_]+)` \|", TABLE.read_text(encoding="utf-8"), flags=re.MULTILINE)


def test_zz_write_table() -> None:
    """With ``FLOWAD_WRITE_BAD_INPUTS=1`` (and every case run), write ``docs/bad_inputs.md``."""
    if not WRITE_TABLE:
        pytest.skip("set FLOWAD_WRITE_BAD_INPUTS=1 to write docs/bad_inputs.md")
    missing = [case.name for case in CASES if case.name not in RESULTS]
    assert not missing, f"run every case to write the table; not run: {missing}"
    TABLE.parent.mkdir(exist_ok=True)
    TABLE.write_text(table(RESULTS), encoding="utf-8")


def test_committed_table_lists_every_case() -> None:
    assert len(CASES) >= 30
    assert len({case.name for case in CASES}) == len(CASES), "case names repeat"
    assert TABLE.is_file(), "docs/bad_inputs.md is missing: run with FLOWAD_WRITE_BAD_INPUTS=1"
    assert committed_case_names() == [case.name for case in CASES], "docs/bad_inputs.md is stale: regenerate it"

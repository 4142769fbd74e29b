"""The console filters drop exactly the known library messages and keep everything else."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import pytest

from flowad_plugins import console


@pytest.fixture
def filters_installed():
    """Install the filters inside a warnings context, so the test leaves the global warning filters as they were."""
    with warnings.catch_warnings():
        console.install_console_filters(force=True)
        yield


def records_kept(logger_name: str, messages: list[str], caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log ``messages`` at WARNING on ``logger_name``; return those that passed the logger's filters."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        for message in messages:
            logging.getLogger(logger_name).warning(message)
    return [record.getMessage() for record in caplog.records]


def test_lightning_tips_and_callback_notice_dropped(filters_installed, caplog: pytest.LogCaptureFixture) -> None:
    noise = ["💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](...)",
             "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels](...)",
             "The following callbacks returned in `LightningModule.configure_callbacks` will override existing "
             "callbacks passed to Trainer: Evaluator, PreProcessor",
             "Loading `train_dataloader` to estimate number of stepping batches."]
    kept = ["GPU available: False, used: False", "`Trainer.fit` stopped: `max_epochs=1` reached."]
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        assert records_kept(name, noise + kept, caplog) == kept


def test_onnx_version_converter_traceback_dropped(filters_installed, caplog: pytest.LogCaptureFixture) -> None:
    caplog.clear()
    logger = logging.getLogger("onnxscript.version_converter")
    with caplog.at_level(logging.INFO):
        try:
            raise RuntimeError("adapter_lookup: Assertion `false` failed: No Adapter To Version $17 for Pad")
        except RuntimeError as error:
            logger.warning("Failed to convert the model to the target version %d using the ONNX C API. The model "
                           "was not modified", 14, exc_info=error)
        logger.warning("The model version conversion is not supported by the onnxscript version converter and "
                       "fallback is enabled. The model will be converted using the onnx C API (target version: 14).")
        logger.warning("some other converter warning")
        logging.getLogger("onnx_ir.passes.common.initializer_deduplication").info("Replaced initializer 'val_1'")
        logging.getLogger("onnx_ir.passes.common.unused_removal").error("a real onnx_ir error")
    assert [record.getMessage() for record in caplog.records] == ["some other converter warning",
                                                                  "a real onnx_ir error"]


def test_known_warnings_ignored_others_kept(filters_installed) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.install_console_filters(force=True)  # our filters go in front of "always"
        warnings.warn("Found 157 module(s) in eval mode at the start of training. This may lead to unexpected "
                      "behavior during training.", UserWarning, stacklevel=1)
        warnings.warn("Trying to infer the `batch_size` from an ambiguous collection. The batch size we found is 8.",
                      UserWarning, stacklevel=1)
        warnings.warn("an unrelated library warning", UserWarning, stacklevel=1)
        warnings.warn("Found 3 images without masks", UserWarning, stacklevel=1)
    assert [str(warning.message) for warning in caught] == ["an unrelated library warning",
                                                            "Found 3 images without masks"]


def test_installed_on_import_without_torch_and_switchable_off() -> None:
    """Importing the package installs the filters, imports neither torch nor anomalib; FLOWAD_VERBOSE=1 skips it."""
    probe = ("import logging, sys, flowad_plugins; "
             "print(bool(logging.getLogger('lightning.pytorch.utilities.rank_zero').filters), "
             "'torch' in sys.modules, 'anomalib' in sys.modules)")
    quiet = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert quiet.stdout.split() == ["True", "False", "False"]
    verbose = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120,
                             env={"FLOWAD_VERBOSE": "1", "PATH": ""})
    assert verbose.stdout.split()[0] == "False"


def test_duplicate_handlers_of_anomalibs_cli_dropped() -> None:
    """anomalib's CLI logging (plain StreamHandler + RichHandler on the root logger) prints each record once after
    the plugin is imported, as the CLI imports it."""
    probe = ("import logging; from anomalib.loggers import configure_logger; configure_logger(); "
             "import flowad_plugins; logging.getLogger('anomalib.probe').info('probe message'); "
             "logging.getLogger('lightning.pytorch.probe').info('lightning probe')")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    assert result.stderr.count("probe message") == 1, result.stderr
    assert result.stderr.count("lightning probe") == 1, result.stderr


def test_missing_and_mismatched_masks_named(tmp_path) -> None:
    from flowad_plugins.cli_errors import missing_masks_message

    for folder, names in (("defect", ["000.png", "001.png", "002.png"]), ("mask", ["000_mask.png", "002_mask.png"])):
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / name).write_bytes(b"")
    message = missing_masks_message([tmp_path / "defect"], [tmp_path / "mask"])
    assert f"no mask for the defective image {tmp_path / 'defect' / '001.png'}: expected " \
           f"{tmp_path / 'mask' / '001_mask.png'}" in message
    assert "2 mask file(s) for 3 defective image(s)" in message
    (tmp_path / "mask" / "001_mask.png").write_bytes(b"")
    assert missing_masks_message(tmp_path / "defect", tmp_path / "mask") is None
    (tmp_path / "mask" / "007_mask.png").write_bytes(b"")
    assert "masks without a defective image: " in missing_masks_message(tmp_path / "defect", tmp_path / "mask")


def test_only_our_own_checks_and_missing_paths_count_as_user_errors() -> None:
    from flowad_plugins.cli_errors import user_error_message
    from flowad_plugins.edge.settings import openvino_config

    def raised(function, *args):
        try:
            function(*args)
        except Exception as error:  # the test wants the exception object with its traceback
            return error
        raise AssertionError("nothing raised")

    ours = raised(openvino_config, "int4")
    assert user_error_message(ours) == str(ours)
    wrapper = raised(lambda: _wrap([ours]))  # jsonargparse style: our error held in a list, its text repeated
    assert user_error_message(wrapper) == str(ours)
    assert user_error_message(raised(lambda: int("x"))) is None  # a ValueError raised outside our package
    assert user_error_message(raised(open, "/nonexistent/flowad")) is not None
    assert user_error_message(raised(lambda: [][1])) is None


def _wrap(errors: list) -> None:
    lines = "\n".join(f"  - {error}" for error in errors)
    raise ValueError(f"Does not validate against any of the Union subtypes\nErrors:\n{lines}")


def test_compact_errors_only_inside_anomalibs_cli() -> None:
    probe = ("import sys, flowad_plugins; hook = getattr(sys.excepthook, 'flowad_compact_errors', False); "
             "import anomalib.cli.cli; from flowad_plugins.cli_errors import install_compact_errors; "
             "print(hook, install_compact_errors(), install_compact_errors())")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    assert result.stdout.split() == ["False", "True", "False"]  # not in a plain program; once under the CLI

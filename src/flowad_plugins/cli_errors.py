"""User mistakes on the ``anomalib`` command line end in a few clear lines instead of a 200-line traceback.

anomalib's CLI prints every exception with rich's boxed traceback and offers no error hook; so when
``flowad_plugins`` is imported inside that CLI, ``install_compact_errors`` puts a ``sys.excepthook`` in front of
anomalib's that prints ``error: <message>`` for a *user error* and passes everything else on (a real bug keeps its
traceback). A user error is:

- a ``ValueError`` / ``TypeError`` / ``ImportError`` / ``OSError`` raised by this package's code, also when
  jsonargparse wrapped it in a "Does not validate against any of the Union subtypes" message;
- a ``FileNotFoundError`` / ``NotADirectoryError`` from anywhere;
- any error inside anomalib's ``make_folder_dataset`` when a defective image has no mask: the message names the
  image and the mask path anomalib expects.

The exit status stays 1. ``FLOWAD_VERBOSE=1`` keeps anomalib's traceback. No torch import here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
USER_ERROR_TYPES = (ValueError, TypeError, ImportError, OSError)
MISSING_PATH_TYPES = (FileNotFoundError, NotADirectoryError)
FOLDER_DATASET_FUNCTION = "make_folder_dataset"  # anomalib.data.datasets.image.folder
DEFAULT_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MAX_LISTED = 5
VERBOSE_HINT = "(FLOWAD_VERBOSE=1 shows the full traceback)"

__all__ = ["install_compact_errors", "missing_masks_message", "user_error_message"]


def _traceback_frames(traceback: TracebackType | None) -> Iterator[Any]:
    while traceback is not None:
        yield traceback.tb_frame
        traceback = traceback.tb_next


def _raised_in_package(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback (its ``raise``) is in this package's source."""
    frames = list(_traceback_frames(error.__traceback__))
    return bool(frames) and Path(frames[-1].f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from or during (``__cause__`` / ``__context__``)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _wrapped_errors(error: BaseException) -> Iterator[BaseException]:
    """Exceptions held by the frames ``error`` passed through whose message ``error`` repeats (jsonargparse keeps
    the errors of each class it tried in a list and raises one summary naming them all)."""
    text = str(error)
    for frame in _traceback_frames(error.__traceback__):
        for value in list(frame.f_locals.values()):
            values = value if isinstance(value, list | tuple) else (value,)
            for item in values:
                first_line = str(item).strip().splitlines()[0] if isinstance(item, BaseException) and str(item) else ""
                if first_line and item is not error and first_line in text:
                    yield item


def _as_paths(value: Any) -> list[Path]:
    if value is None or value == "":
        return []
    if isinstance(value, str | Path):
        return [Path(value)]
    return [Path(item) for item in value]


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


PathOrPaths = str | Path | Sequence[str | Path] | None


def missing_masks_message(abnormal_dirs: PathOrPaths, mask_dirs: PathOrPaths,
                          suffixes: Sequence[str] | None = None) -> str | None:
    """What is wrong with the masks of anomalib's ``Folder`` layout, or ``None`` when every defective image has one.

    anomalib pairs the sorted images of ``abnormal_dirs`` with the sorted files of ``mask_dirs`` one to one and
    requires each mask's name to contain its image's name (``007.png`` → ``007_mask.png``).
    """
    suffixes = tuple(s.lower() for s in (suffixes or DEFAULT_IMAGE_SUFFIXES))

    def files(folders: list[Path]) -> list[Path]:
        return sorted(p for folder in folders if folder.is_dir() for p in folder.iterdir()
                      if p.is_file() and p.suffix.lower() in suffixes)

    mask_folders = _as_paths(mask_dirs)
    images, masks = files(_as_paths(abnormal_dirs)), files(mask_folders)
    if not mask_folders or not images:
        return None
    matches = {image: [mask for mask in masks if image.stem in mask.stem] for image in images}
    missing = [image for image, found in matches.items() if not found]
    if not missing and len(masks) == len(images):
        return None
    example = next(((image, found[0]) for image, found in matches.items() if found), None)
    pattern = example[1].name.replace(example[0].stem, "{stem}", 1) if example else "{stem}_mask.png"
    folder = masks[0].parent if masks else mask_folders[0]
    counts = f"{len(masks)} mask file(s) for {len(images)} defective image(s) in mask_dir={_shown(mask_folders[0])!r}"
    if missing:
        lines = [f"no mask for the defective image {_shown(image)}: expected "
                 f"{_shown(folder / pattern.format(stem=image.stem))}" for image in missing[:MAX_LISTED]]
        if len(missing) > MAX_LISTED:
            lines.append(f"... and {len(missing) - MAX_LISTED} more")
        return "\n".join([*lines, f"{counts}; each mask's name must contain its image's name."])
    extra = [mask for mask in masks if not any(mask in found for found in matches.values())]
    listed = ", ".join(_shown(mask) for mask in extra[:MAX_LISTED]) or "several images share a mask"
    return f"{counts}: masks without a defective image: {listed}."


def _folder_mask_problem(error: BaseException) -> str | None:
    """The mask problem behind an error raised inside anomalib's ``make_folder_dataset``, if there is one."""
    for frame in _traceback_frames(error.__traceback__):
        if frame.f_code.co_name == FOLDER_DATASET_FUNCTION and "anomalib" in frame.f_code.co_filename:
            arguments = frame.f_locals
            try:
                return missing_masks_message(arguments.get("abnormal_dir"), arguments.get("mask_dir"),
                                             arguments.get("extensions"))
            except (OSError, TypeError, ValueError):
                return None
    return None


def user_error_message(error: BaseException) -> str | None:
    """The message to print for ``error`` when it is a user error (see the module), else ``None``."""
    mask_problem = _folder_mask_problem(error)
    if mask_problem:
        return mask_problem
    for candidate in [*_chain(error), *_wrapped_errors(error)]:
        if isinstance(candidate, USER_ERROR_TYPES) and _raised_in_package(candidate):
            return str(candidate)
    for candidate in _chain(error):
        if isinstance(candidate, MISSING_PATH_TYPES):
            return str(candidate)
    return None


def _compact_hook(previous: Callable[..., Any]) -> Callable[..., Any]:
    def hook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        try:
            message = user_error_message(error)
        except Exception:  # never hide the original error behind one of ours
            message = None
        if message is None:
            previous(kind, error, traceback)
            return
        sys.stderr.write(f"error: {message}\n{VERBOSE_HINT}\n")

    hook.flowad_compact_errors = True  # type: ignore[attr-defined]
    return hook


def install_compact_errors() -> bool:
    """Put the user-error hook in front of ``sys.excepthook`` when running inside anomalib's CLI; returns whether it
    did. Nothing happens elsewhere (a Python program keeps its tracebacks), twice, or with ``FLOWAD_VERBOSE`` set."""
    if "anomalib.cli.cli" not in sys.modules or os.environ.get("FLOWAD_VERBOSE", "0") not in ("", "0"):
        return False
    if getattr(sys.excepthook, "flowad_compact_errors", False):
        return False
    sys.excepthook = _compact_hook(sys.excepthook)
    return True

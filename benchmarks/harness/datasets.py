"""The datamodules of the accuracy benchmarks, with validation = 20 % of train/good + synthetic anomalies.

One definition for every script that trains on bottle, tire or the embedded generated data, so that their
validation splits (and thresholds) are the same images: the split seed fixes which normal images are held out.
"""

from __future__ import annotations

from pathlib import Path
from tempfile import mkdtemp

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
GENERATED = "generated"  # the embedded generated data (flowad_plugins.data.SyntheticAD, category "object", 256 px)
DEFAULT_ROOTS = {"bottle": SHARED / "mvtec_ad", "tire": SHARED / "mvtec_3d_rgb"}
HELD_OUT = ("random", "last")  # which normal training images validation holds out


def validation_split_datamodule(category: str, batch_size: int, root: Path | None = None, num_workers: int = 0,
                                seed: int = 0, held_out: str = "random"):
    """``category``'s datamodule (MVTec layout under ``root``, default ``DEFAULT_ROOTS``; or ``GENERATED``, written
    to a temporary folder) with validation = 20 % of train/good + synthetic anomalies drawn with ``seed``: a random
    20 % (``held_out="random"``) or the last 20 % in file order (``"last"``: the latest capture session,
    ``flowad_plugins.data.hold_out_latest``)."""
    if held_out not in HELD_OUT:
        msg = f"held_out must be one of {list(HELD_OUT)}, got {held_out!r}."
        raise ValueError(msg)
    from anomalib.data import MVTecAD

    from flowad_plugins.data import SyntheticAD, hold_out_latest

    common = {"train_batch_size": batch_size, "eval_batch_size": batch_size, "num_workers": num_workers,
              "val_split_mode": "synthetic", "val_split_ratio": 0.2, "seed": seed}
    if category == GENERATED:
        cls = SyntheticAD if held_out == "random" else hold_out_latest(SyntheticAD)
        return cls(root=Path(mkdtemp()) / GENERATED, category="object", image_size=256, **common)
    if root is None and category not in DEFAULT_ROOTS:
        msg = f"category {category!r} needs a root; known without one: {[*DEFAULT_ROOTS, GENERATED]}"
        raise ValueError(msg)
    cls = MVTecAD if held_out == "random" else hold_out_latest(MVTecAD)
    return cls(root=root or DEFAULT_ROOTS[category], category=category, **common)

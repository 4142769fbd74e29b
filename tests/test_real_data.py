"""A short real-data check on MVTec AD bottle (skipped when ../shared/data/mvtec_ad is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from conftest import REAL_DATA_ROOT
from lightning.pytorch import seed_everything

from flowad_plugins import CflowAD

pytestmark = pytest.mark.skipif(
    not (REAL_DATA_ROOT / "bottle" / "train" / "good").is_dir(),
    reason=f"real data absent: MVTec AD bottle expected at {REAL_DATA_ROOT}/bottle (see README, 'Data')",
)


def test_cflow_ad_detects_real_bottle_defects(tmp_path: Path) -> None:
    seed_everything(0)
    datamodule = MVTecAD(root=REAL_DATA_ROOT, category="bottle", train_batch_size=16, eval_batch_size=16,
                         num_workers=0, val_split_mode="synthetic", val_split_ratio=0.2, seed=0)
    # the default architecture and schedule (configs/cflow_ad_efficientnet_lite0.yaml), 2 epochs instead of 10
    model = CflowAD(backbone="efficientnet_lite0", layers=["blocks.2", "blocks.4"])
    engine = Engine(max_epochs=2, accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path,
                    enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    assert metrics["image_AUROC"] > 0.95
    assert metrics["pixel_AUROC"] > 0.9

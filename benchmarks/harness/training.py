"""The training task of one benchmark model: time per training epoch; test metrics on a real dataset."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def run_train(task: dict[str, Any]) -> dict[str, Any]:
    """Fit ``task["epochs"]`` epochs, timing each training epoch (validation excluded); test on a real dataset."""
    import torch
    from anomalib.engine import Engine
    from lightning.pytorch import Callback, seed_everything

    from harness.models import build_benchmark_model

    class EpochTimer(Callback):
        """Wall time of each training epoch (data loading included, validation excluded)."""

        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.start = 0.0

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self.seconds.append(time.perf_counter() - self.start)

    torch.set_num_threads(task["threads"])
    seed_everything(0, workers=True)
    size = task["image_size"]
    real_data = bool(task.get("data_root"))
    model = build_benchmark_model(task["model"], size, real_weights=real_data)
    if real_data:
        from anomalib.data import MVTecAD

        datamodule = MVTecAD(root=task["data_root"], category=task["category"], train_batch_size=task["batch_size"],
                             eval_batch_size=task["batch_size"], num_workers=min(2, task["threads"]),
                             val_split_mode="synthetic", val_split_ratio=0.2, seed=0)
    else:
        from flowad_plugins.data import SyntheticAD

        datamodule = SyntheticAD(root=Path(task["work_dir"]) / "train_data", category="surface", image_size=size,
                                 num_train=task["train_images"], num_test_good=2, num_test_per_defect=1,
                                 train_batch_size=task["batch_size"], eval_batch_size=task["batch_size"])
    timer = EpochTimer()
    engine = Engine(max_epochs=task["epochs"], accelerator="gpu" if task["device"] == "cuda" else "cpu", devices=1,
                    logger=False, default_root_dir=task["work_dir"], enable_progress_bar=False, callbacks=[timer])
    engine.fit(model=model, datamodule=datamodule)
    datamodule.setup("fit")
    result: dict[str, Any] = {
        "epoch_seconds": [round(value, 2) for value in timer.seconds],
        "train_seconds_per_epoch": round(sum(timer.seconds) / max(len(timer.seconds), 1), 2),
        "train_images": len(datamodule.train_data),
        "epochs": task["epochs"],
        "data": f"{task['data_root']}/{task['category']}" if real_data else f"generated surface, {size} px",
        "metrics": None,
    }
    if real_data:
        metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
        result["metrics"] = {key: round(float(value), 4) for key, value in metrics.items()}
    return result

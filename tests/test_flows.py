"""Invertible building blocks: exact inverses, log-determinants equal to autograd's, encodings."""

from __future__ import annotations

import pytest
import torch

from flowad_plugins.flows import (
    PositionalEncoding2D,
    conv_flow,
    coupling_log_scale,
    fiber_flow,
    fiber_flow_forward,
    positional_encoding_2d,
)


def _randomise(flow: torch.nn.Module) -> None:
    """Give every trainable parameter random values so the flow is far from the identity it starts at.

    (FrEIA keeps its fixed permutation and its inverse as frozen parameters; those stay as built.)
    """
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in flow.parameters():
            if parameter.requires_grad:
                parameter.copy_(0.3 * torch.randn_like(parameter))


def test_coupling_log_scale_is_the_tanh_clamp_with_its_gradient() -> None:
    raw = torch.linspace(-60, 60, 4001, dtype=torch.float32, requires_grad=True)
    fast = coupling_log_scale(raw, 2.0)
    reference = 2.0 * torch.tanh(raw)
    assert (fast - reference).abs().max() < 1e-6
    (grad_fast,) = torch.autograd.grad(fast.sum(), raw)
    (grad_reference,) = torch.autograd.grad(reference.sum(), raw)
    assert torch.allclose(grad_fast, grad_reference, atol=1e-6)


def test_conditional_fiber_flow_inverts_exactly() -> None:
    flow = fiber_flow(6, coupling_blocks=4, clamp_alpha=1.9, condition_dim=8, permute_soft=True).double()
    _randomise(flow)
    x, c = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 8, dtype=torch.float64)
    z, log_det = flow(x, c=[c])
    x_back, log_det_back = flow(z, c=[c], rev=True)
    assert not torch.allclose(z, x, atol=1e-2)
    # FrEIA stores the soft permutation in float32: the inverse is exact to float32 rounding, not float64.
    torch.testing.assert_close(x_back, x, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(log_det_back, -log_det, atol=1e-5, rtol=0)


def test_fiber_flow_log_det_matches_autograd_jacobian() -> None:
    flow = fiber_flow(4, coupling_blocks=3, clamp_alpha=1.9, condition_dim=4, permute_soft=True).double()
    _randomise(flow)
    x, c = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    _, log_det = flow(x, c=[c])
    for i in range(3):
        jacobian = torch.autograd.functional.jacobian(lambda v, i=i: flow(v[None], c=[c[i : i + 1]])[0][0], x[i])
        # float32 soft permutation inside FrEIA: its determinant is 1 only to ~1e-8 per block
        assert log_det[i].item() == pytest.approx(torch.linalg.slogdet(jacobian)[1].item(), abs=1e-6)


def test_conv_flow_inverts_and_log_det_matches_autograd() -> None:
    flow = conv_flow((2, 3, 3), flow_steps=2, clamp_alpha=2.0, kernel_sizes=[3, 1]).double()
    _randomise(flow)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    z, log_det = flow(x)
    torch.testing.assert_close(flow(z, rev=True)[0], x, atol=1e-9, rtol=0)
    jacobian = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0].flatten(), x[0]).reshape(18, 18)
    assert log_det[0].item() == pytest.approx(torch.linalg.slogdet(jacobian)[1].item(), abs=1e-8)


def test_positional_encoding_codes_x_then_y() -> None:
    encoding = positional_encoding_2d(8, height=3, width=5)
    assert encoding.shape == (8, 3, 5)
    assert torch.allclose(encoding[0], torch.sin(torch.arange(5.0)).expand(3, 5))  # x, lowest frequency
    assert torch.allclose(encoding[5], torch.cos(torch.arange(3.0))[:, None].expand(3, 5))  # y, cos
    second_frequency = 1e4 ** (-2 / 4)  # 10000^(-2i/(dim/2)) with i=1, dim/2=4
    assert torch.allclose(encoding[2], torch.sin(torch.arange(5.0) * second_frequency).expand(3, 5), atol=1e-6)


def test_positional_encoding_flattens_row_major_and_is_cached() -> None:
    encoder = PositionalEncoding2D(8)
    fibers = encoder(3, 5)
    assert fibers.shape == (15, 8)
    assert torch.equal(fibers[7], positional_encoding_2d(8, 3, 5)[:, 1, 2])  # y=1, x=2
    assert encoder(3, 5) is fibers


@pytest.mark.parametrize("dim", [0, 6, -4])
def test_positional_encoding_rejects_bad_dim(dim: int) -> None:
    with pytest.raises(ValueError, match="condition_dim must be a positive multiple of 4"):
        positional_encoding_2d(dim, 2, 2)


def test_fiber_flow_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="coupling_blocks must be positive"):
        fiber_flow(8, coupling_blocks=0, clamp_alpha=1.9)
    with pytest.raises(ValueError, match="n_features=1"):
        fiber_flow(1, coupling_blocks=2, clamp_alpha=1.9)


@pytest.mark.parametrize("permute_soft", [True, False])
def test_position_table_pass_equals_freia_forward(permute_soft: bool) -> None:
    flow = fiber_flow(7, coupling_blocks=3, clamp_alpha=1.9, condition_dim=8, permute_soft=permute_soft)
    _randomise(flow)
    table = torch.randn(5, 8)
    index = torch.randint(0, 5, (40,))
    x = torch.randn(40, 7)
    z_reference, log_det_reference = flow(x, c=[table[index]])
    z, log_det = fiber_flow_forward(flow, x, table, index)
    torch.testing.assert_close(z, z_reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_det, log_det_reference, atol=1e-5, rtol=1e-5)
    # gradients flow to the same parameters
    (z.pow(2).sum() + log_det.sum()).backward()
    assert all(p.grad is not None for p in flow.parameters() if p.requires_grad)


@pytest.mark.parametrize("maps", [1, 3])
def test_position_table_pass_broadcasts_whole_maps(maps: int) -> None:
    """Without an index, fibers of whole maps (B·T rows, table order) match FrEIA with the table repeated."""
    flow = fiber_flow(6, coupling_blocks=2, clamp_alpha=1.9, condition_dim=8)
    _randomise(flow)
    table = torch.randn(5, 8)
    x = torch.randn(maps * 5, 6)
    z_reference, log_det_reference = flow(x, c=[table.repeat(maps, 1)])
    z, log_det = fiber_flow_forward(flow, x, table)
    torch.testing.assert_close(z, z_reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_det, log_det_reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="whole maps of 5 positions"):
        fiber_flow_forward(flow, x[:-1], table)

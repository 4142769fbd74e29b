"""The coupling block and its stacks: FrEIA 0.2's AllInOneBlock as the reference, exact inverses, log-dets equal to
autograd's, the CFLOW fast paths, pickling; the positional encoding."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock

from flowad_plugins.flows import (
    PositionalEncoding2D,
    conv_flow,
    conv_subnet,
    fiber_flow,
    fiber_flow_forward,
    fold_conditional_flow,
    linear_subnet,
    map_flow_forward,
    positional_encoding_2d,
    tanh_clamp,
    tanh_clamp_via_sigmoid,
)


def _randomise(flow: torch.nn.Module) -> None:
    """Give every trainable parameter random values so the flow is far from the identity it starts at
    (the fixed channel mixing and its inverse stay as built)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in flow.parameters():
            if parameter.requires_grad:
                parameter.copy_(0.3 * torch.randn_like(parameter))


def _freia_reference(dims: tuple[int, ...], blocks: int, subnet, clamp: float, permute_soft: bool,
                     condition_dim: int = 0) -> SequenceINN:
    flow = SequenceINN(*dims)
    condition = {"cond": 0, "cond_shape": (condition_dim, *dims[1:])} if condition_dim else {}
    for _ in range(blocks):
        flow.append(AllInOneBlock, subnet_constructor=subnet, affine_clamping=clamp, global_affine_type="SOFTPLUS",
                    permute_soft=permute_soft, **condition)
    return flow


def _seed(seed: int = 3) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


@pytest.mark.parametrize("permute_soft", [True, False])
def test_fiber_flow_initialises_and_computes_as_freia(permute_soft: bool) -> None:
    """Same seed → the same initial weights as FrEIA's AllInOneBlock (state dicts interchangeable), same outputs."""
    _seed()
    ours = fiber_flow(7, coupling_blocks=3, clamp_alpha=1.9, condition_dim=8, permute_soft=permute_soft)
    _seed()
    reference = _freia_reference((7,), 3, linear_subnet(2.0), 1.9, permute_soft, condition_dim=8)
    assert set(ours.state_dict()) == set(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    _randomise(reference)
    ours.load_state_dict(reference.state_dict())
    x, c = torch.randn(40, 7), torch.randn(40, 8)
    z_reference, log_det_reference = reference(x, c=[c])
    z, log_det = ours(x, c)
    torch.testing.assert_close(z, z_reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_det, log_det_reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.inverse(z, c), reference(z, c=[c], rev=True)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kernel_sizes", "permute_soft"), [([3], False), ([3, 1], False), ([3, 1], True)])
def test_conv_flow_equals_freia_and_keeps_log_det_per_position(kernel_sizes: list[int], permute_soft: bool) -> None:
    _seed()
    ours = conv_flow((5, 4, 6), flow_steps=4, clamp_alpha=2.0, kernel_sizes=kernel_sizes, permute_soft=permute_soft)
    _seed()
    reference = SequenceINN(5, 4, 6)
    for step in range(4):
        reference.append(AllInOneBlock, subnet_constructor=conv_subnet(kernel_sizes[step % len(kernel_sizes)]),
                         affine_clamping=2.0, global_affine_type="SOFTPLUS", permute_soft=permute_soft)
    for key, value in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    reference = reference.double()
    _randomise(reference)
    ours = ours.double()
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(3, 5, 4, 6, dtype=torch.float64)
    z, log_det_map = ours(x)
    z_reference, log_det_reference = reference(x)
    assert log_det_map.shape == (3, 4, 6)
    torch.testing.assert_close(z, z_reference, atol=1e-10, rtol=0)
    torch.testing.assert_close(log_det_map.sum(dim=(1, 2)), log_det_reference, atol=1e-9, rtol=0)
    # the rotation is stored in float32 (as FrEIA does): its inverse (the transpose) is exact to float32 rounding
    torch.testing.assert_close(ours.inverse(z), x, atol=2e-3 if permute_soft else 1e-9, rtol=0)


def test_tanh_clamp_via_sigmoid_is_the_tanh_clamp_with_its_gradient() -> None:
    raw = torch.linspace(-60, 60, 4001, dtype=torch.float32, requires_grad=True)
    fast = tanh_clamp_via_sigmoid(raw, 2.0)
    reference = tanh_clamp(raw, 2.0)
    assert (fast - reference).abs().max() < 1e-6
    (grad_fast,) = torch.autograd.grad(fast.sum(), raw)
    (grad_reference,) = torch.autograd.grad(reference.sum(), raw)
    assert torch.allclose(grad_fast, grad_reference, atol=1e-6)


def test_conditional_fiber_flow_inverts_exactly() -> None:
    flow = fiber_flow(6, coupling_blocks=4, clamp_alpha=1.9, condition_dim=8, permute_soft=True).double()
    _randomise(flow)
    x, c = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 8, dtype=torch.float64)
    z, _ = flow(x, c)
    assert not torch.allclose(z, x, atol=1e-2)
    # the rotation is stored in float32 (as FrEIA does): the inverse is exact to float32 rounding
    torch.testing.assert_close(flow.inverse(z, c), x, atol=1e-4, rtol=1e-4)


def test_fiber_flow_log_det_matches_autograd_jacobian() -> None:
    flow = fiber_flow(4, coupling_blocks=3, clamp_alpha=1.9, condition_dim=4, permute_soft=True).double()
    _randomise(flow)
    x, c = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    _, log_det = flow(x, c)
    for i in range(3):
        jacobian = torch.autograd.functional.jacobian(lambda v, i=i: flow(v[None], c[i : i + 1])[0][0], x[i])
        # float32 rotation: its determinant is 1 only to ~1e-8 per block
        assert log_det[i].item() == pytest.approx(torch.linalg.slogdet(jacobian)[1].item(), abs=1e-6)


def test_conv_flow_log_det_matches_autograd_jacobian() -> None:
    flow = conv_flow((2, 3, 3), flow_steps=3, clamp_alpha=2.0, kernel_sizes=[3, 1]).double()
    _randomise(flow)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    _, log_det_map = flow(x)
    jacobian = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0].flatten(), x[0]).reshape(18, 18)
    assert log_det_map.sum().item() == pytest.approx(torch.linalg.slogdet(jacobian)[1].item(), abs=1e-9)


def test_conv_flow_log_det_is_local() -> None:
    """Changing the input far away (beyond the subnets' receptive field) leaves a position's log-det alone."""
    flow = conv_flow((4, 1, 16), flow_steps=2, clamp_alpha=2.0, kernel_sizes=[3]).double()
    _randomise(flow)
    x = torch.randn(1, 4, 1, 16, dtype=torch.float64)
    changed = x.clone()
    changed[..., 12:] += 5.0
    _, before = flow(x)
    _, after = flow(changed)
    torch.testing.assert_close(after[..., :4], before[..., :4], atol=1e-12, rtol=0)
    assert not torch.allclose(after[..., 12:], before[..., 12:])


def test_flows_pickle_and_keep_their_outputs() -> None:
    """No lambdas inside: a whole flow pickles (anomalib's TORCH export saves the model object)."""
    for flow, x in [(conv_flow((4, 3, 3), 2, 2.0, [3, 1]), torch.randn(2, 4, 3, 3)),
                    (fiber_flow(6, 2, 1.9, condition_dim=4, permute_soft=False), torch.randn(5, 6))]:
        _randomise(flow)
        condition = torch.randn(5, 4) if x.dim() == 2 else None
        restored = pickle.loads(pickle.dumps(flow))
        assert torch.equal(restored(x, condition)[0], flow(x, condition)[0])


def test_loaded_mixing_weights_are_used() -> None:
    """The mixing is read from the weights on every call: a rotation loaded over a permutation takes effect."""
    flow = conv_flow((4, 2, 2), 1, 2.0, [1], permute_soft=False)
    x = torch.randn(1, 4, 2, 2)
    before = flow(x)[0]
    state = flow.state_dict()
    rotation = torch.linalg.qr(torch.randn(4, 4))[0].reshape(4, 4, 1, 1)
    state["module_list.0.w_perm"], state["module_list.0.w_perm_inv"] = rotation, rotation.transpose(0, 1)
    flow.load_state_dict(state)
    assert not torch.allclose(flow(x)[0], before)
    torch.testing.assert_close(flow.inverse(flow(x)[0]), x, atol=1e-5, rtol=1e-5)


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
    with pytest.raises(ValueError, match="condition_channels=8"):
        fiber_flow(4, coupling_blocks=1, clamp_alpha=1.9, condition_dim=8)(torch.randn(2, 4))


@pytest.mark.parametrize("permute_soft", [True, False])
def test_position_table_pass_equals_the_block_forward(permute_soft: bool) -> None:
    flow = fiber_flow(7, coupling_blocks=3, clamp_alpha=1.9, condition_dim=8, permute_soft=permute_soft)
    _randomise(flow)
    table = torch.randn(5, 8)
    index = torch.randint(0, 5, (40,))
    x = torch.randn(40, 7)
    z_reference, log_det_reference = flow(x, table[index])
    z, log_det = fiber_flow_forward(flow, x, table, index)
    torch.testing.assert_close(z, z_reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_det, log_det_reference, atol=1e-5, rtol=1e-5)
    # gradients flow to the same parameters
    (z.pow(2).sum() + log_det.sum()).backward()
    assert all(p.grad is not None for p in flow.parameters() if p.requires_grad)


@pytest.mark.parametrize("maps", [1, 3])
def test_position_table_pass_broadcasts_whole_maps(maps: int) -> None:
    """Without an index, fibers of whole maps (B·T rows, table order) match the block with the table repeated, and
    the map form (1×1 convolutions on B×C×h×w) gives the same."""
    flow = fiber_flow(6, coupling_blocks=2, clamp_alpha=1.9, condition_dim=8)
    _randomise(flow)
    table = torch.randn(6, 8)  # a 2×3 map
    x = torch.randn(maps * 6, 6)
    z_reference, log_det_reference = flow(x, table.repeat(maps, 1))
    z, log_det = fiber_flow_forward(flow, x, table)
    torch.testing.assert_close(z, z_reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_det, log_det_reference, atol=1e-5, rtol=1e-5)
    as_maps = x.reshape(maps, 2, 3, 6).permute(0, 3, 1, 2)
    z_maps, log_det_maps = map_flow_forward(fold_conditional_flow(flow, table), as_maps)
    torch.testing.assert_close(z_maps.permute(0, 2, 3, 1).reshape(-1, 6), z_reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_det_maps.reshape(-1), log_det_reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="whole maps of 6 positions"):
        fiber_flow_forward(flow, x[:-1], table)


def test_traced_flow_uses_the_dense_mixing_and_gives_the_same_result() -> None:
    """A hard permutation is one product with the global affine folded in (no gather), traced as in eager mode."""
    flow = conv_flow((6, 4, 4), 3, 2.0, [3, 1], permute_soft=False).eval()
    _randomise(flow)
    flow.requires_grad_(False)
    x = torch.randn(2, 6, 4, 4)
    with torch.no_grad():
        eager_z, eager_log_det = flow(x)
        traced = torch.jit.trace(lambda v: flow(v), (x,), check_trace=False)
        traced_z, traced_log_det = traced(x)
    assert "index_select" not in str(traced.graph)
    torch.testing.assert_close(traced_z, eager_z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(traced_log_det, eager_log_det, atol=1e-5, rtol=1e-5)

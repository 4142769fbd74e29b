"""Forward pass of a ``conv_flow`` stack that keeps the log-determinant per spatial position.

FrEIA's ``SequenceINN`` returns ``log|det J|`` summed over the whole map (``B``). A 2D coupling step
scales every channel at every position by its own factor, so the Jacobian is block-triangular and its
log-determinant is a sum of per-position terms: ``Σ_c s_c(h, w)`` of the coupling plus ``Σ_c log g_c``
of the global affine (a hard permutation contributes 0). ``conv_flow_forward`` evaluates the same
``AllInOneBlock`` parameters as FrEIA, returning ``z`` and that map ``B×h×w``; its sum over positions
equals FrEIA's value. A hard permutation is applied as a channel gather instead of FrEIA's dense 1×1
convolution (same result, ``C×C`` fewer multiply-adds per position; FrEIA's 1×1 convolution even takes
PyTorch's slow non-oneDNN path on CPU), and the subnet's 0.1 damping is folded into its last convolution.
Keep the maps in NCHW here: a channel gather then copies whole planes. The inverse stays FrEIA's
``flow(z, rev=True)``.
"""

from __future__ import annotations

import torch
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from torch.nn import functional as F

from flowad_plugins.flows.coupling import coupling_log_scale
from flowad_plugins.tracing import is_exporting


def _check_block(block: torch.nn.Module) -> AllInOneBlock:
    """Refuse blocks whose options this pass does not reproduce (FrEIA's forward would be needed)."""
    if not isinstance(block, AllInOneBlock):
        msg = f"conv_flow_forward supports AllInOneBlock steps only, got {type(block).__name__}."
        raise TypeError(msg)
    if block.GIN or block.householder or block.reverse_pre_permute or block.conditional or block.input_rank != 2:
        msg = (
            "conv_flow_forward supports unconditional 2D AllInOneBlocks without GIN, Householder or reverse "
            "permutation (as built by conv_flow)."
        )
        raise ValueError(msg)
    return block


def permutation_index(block: AllInOneBlock) -> torch.Tensor | None:
    """Channel order ``out[i] = in[index[i]]`` of a hard-permutation block, ``None`` for a soft (dense) one.

    Whether ``w_perm`` is one-hot is a data-dependent test that ``torch.export`` cannot trace, so it runs
    eagerly and its answer is remembered on the block (with the index, until ``w_perm`` changes in place);
    while exporting, the remembered answer decides (never seen: the dense path, always correct) and the index
    itself stays a graph op on the exported weights.
    """
    if is_exporting():
        hard = getattr(block, "_flowad_hard_permutation", False)
        return block.w_perm.detach().flatten(1).argmax(dim=1) if hard else None
    cached = getattr(block, "_flowad_permutation_cache", None)  # (w_perm key, index or None)
    key = (block.w_perm.data_ptr(), block.w_perm._version)  # new storage (.to(device)) or in-place change
    if cached is not None and cached[0] == key:
        return cached[1]
    weight = block.w_perm.detach().flatten(1)
    index = weight.argmax(dim=1)
    hard = torch.equal(weight, F.one_hot(index, weight.shape[1]).to(weight.dtype))
    block._flowad_hard_permutation = hard
    block._flowad_permutation_cache = (key, index if hard else None)
    return index if hard else None


def _coupling_coefficients(subnet: torch.nn.Module, x1: torch.Tensor) -> torch.Tensor:
    """``0.1 · subnet(x1)`` (AllInOneBlock's damping), folded into the last convolution when the subnet is
    ``conv_subnet``'s ``Conv → ReLU → Conv`` (one pass over the coefficients less)."""
    layers = list(subnet) if isinstance(subnet, torch.nn.Sequential) else []
    if (
        len(layers) == 3
        and isinstance(layers[0], torch.nn.Conv2d)
        and isinstance(layers[1], torch.nn.ReLU)
        and isinstance(layers[2], torch.nn.Conv2d)
        and layers[2].bias is not None
        and layers[2].padding_mode == "zeros"
    ):
        last = layers[2]
        hidden = F.relu(layers[0](x1), inplace=True)  # a convolution's fresh output: autograd-safe in place
        return F.conv2d(
            hidden, 0.1 * last.weight, 0.1 * last.bias, last.stride, last.padding, last.dilation, last.groups
        )
    return subnet(x1) * 0.1


def coupling_step(
    block: AllInOneBlock,
    x: torch.Tensor,
    with_log_det: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One AllInOneBlock step on ``x: B×C×h×w`` → ``(y B×C×h×w, log|det J| per position B×h×w or None)``."""
    x1, x2 = torch.split(x, block.splits, dim=1)
    coefficients = _coupling_coefficients(block.subnet, x1)
    passive = block.splits[1]
    log_scale = coupling_log_scale(coefficients[:, :passive], block.clamp)
    x2 = torch.addcmul(coefficients[:, passive:], x2, torch.exp(log_scale))  # x2·e^s + t
    coupled = torch.cat((x1, x2), dim=1)
    global_scale = block.global_scale_activation(block.global_scale)  # 1×C×1×1
    index = permutation_index(block)
    if index is not None:
        # permute first (whole h×w planes copied: cheap in NCHW), then the permuted global affine in one op
        y = torch.addcmul(block.global_offset[:, index], coupled.index_select(1, index), global_scale[:, index])
    else:
        y = F.conv2d(torch.addcmul(block.global_offset, coupled, global_scale), block.w_perm)
    if not with_log_det:
        return y, None
    return y, log_scale.sum(dim=1) + torch.log(global_scale).sum()


def conv_flow_forward(
    flow: SequenceINN,
    x: torch.Tensor,
    with_log_det: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the ``conv_flow`` stack on ``x: B×C×h×w`` → ``(z B×C×h×w, log|det J| per position B×h×w)``.

    Differentiable (used for training) and equal to ``flow(x)`` with ``log_det.sum((1, 2))`` = FrEIA's
    ``log_jac_det``. ``with_log_det=False`` skips the log-det (returns ``None``) when only ``z`` is needed.
    """
    log_det = x.new_zeros(x.shape[0], x.shape[2], x.shape[3]) if with_log_det else None
    for block in flow.module_list:
        x, step_log_det = coupling_step(_check_block(block), x, with_log_det)
        if step_log_det is not None:
            log_det = log_det + step_log_det
    return x, log_det

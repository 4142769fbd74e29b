"""Forward pass of a ``conv_flow`` stack that keeps the log-determinant per spatial position.

FrEIA's ``SequenceINN`` returns ``log|det J|`` summed over the whole map (``B``). A 2D coupling step
scales every channel at every position by its own factor, so the Jacobian is block-triangular and its
log-determinant is a sum of per-position terms: ``Σ_c s_c(h, w)`` of the coupling plus ``Σ_c log g_c``
of the global affine (a hard permutation contributes 0). ``conv_flow_forward`` evaluates the same
``AllInOneBlock`` parameters as FrEIA, returning ``z`` and that map ``B×h×w``; its sum over positions
equals FrEIA's value. A hard permutation is applied as a channel gather instead of FrEIA's dense 1×1
convolution (same result, ``C×C`` fewer multiply-adds per position). The inverse stays FrEIA's
``flow(z, rev=True)``.
"""

from __future__ import annotations

import torch
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from torch.nn import functional as F


def _check_block(block: torch.nn.Module) -> AllInOneBlock:
    """Refuse blocks whose options this pass does not reproduce (FrEIA's forward would be needed)."""
    if not isinstance(block, AllInOneBlock):
        msg = f"conv_flow_forward supports AllInOneBlock steps only, got {type(block).__name__}."
        raise TypeError(msg)
    if block.GIN or block.householder or block.reverse_pre_permute or block.conditional or block.input_rank != 2:
        msg = ("conv_flow_forward supports unconditional 2D AllInOneBlocks without GIN, Householder or reverse "
               "permutation (as built by conv_flow).")
        raise ValueError(msg)
    return block


def permutation_index(block: AllInOneBlock) -> torch.Tensor | None:
    """Channel order ``out[i] = in[index[i]]`` of a hard-permutation block, ``None`` for a soft (dense) one."""
    weight = block.w_perm.detach().flatten(1)
    index = weight.argmax(dim=1)
    if torch.equal(weight, F.one_hot(index, weight.shape[1]).to(weight.dtype)):
        return index
    return None


def coupling_step(block: AllInOneBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One AllInOneBlock step on ``x: B×C×h×w`` → ``(y B×C×h×w, log|det J| per position B×h×w)``."""
    x1, x2 = torch.split(x, block.splits, dim=1)
    coefficients = block.subnet(x1) * 0.1
    passive = block.splits[1]
    log_scale = block.clamp * torch.tanh(coefficients[:, :passive])
    x2 = x2 * torch.exp(log_scale) + coefficients[:, passive:]
    global_scale = block.global_scale_activation(block.global_scale)  # 1×C×1×1
    y = torch.cat((x1, x2), dim=1) * global_scale + block.global_offset
    index = permutation_index(block)
    y = y.index_select(1, index) if index is not None else F.conv2d(y, block.w_perm)
    return y, log_scale.sum(dim=1) + torch.log(global_scale).sum()


def conv_flow_forward(flow: SequenceINN, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the ``conv_flow`` stack on ``x: B×C×h×w`` → ``(z B×C×h×w, log|det J| per position B×h×w)``.

    Differentiable (used for training) and equal to ``flow(x)`` with ``log_det.sum((1, 2))`` = FrEIA's
    ``log_jac_det``.
    """
    log_det = x.new_zeros(x.shape[0], x.shape[2], x.shape[3])
    for block in flow.module_list:
        x, step_log_det = coupling_step(_check_block(block), x)
        log_det = log_det + step_log_det
    return x, log_det

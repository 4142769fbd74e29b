"""Forward pass of a conditional ``fiber_flow`` that projects the condition once per position.

In CFLOW-AD the condition of a fiber is the positional encoding of its position, so the subnet's first
layer ``W·[x₁; c] + b = W_x·x₁ + (W_c·c + b)`` repeats the same ``W_c·c + b`` for every image at a
position. ``fiber_flow_forward`` evaluates the same FrEIA ``AllInOneBlock`` parameters (same maths:
affine coupling with the 0.1 pre-scale and ``clamp·tanh`` clamp, global affine, permutation) but
computes ``W_c·c + b`` once per distinct condition row (``T×hidden``) and gathers it per fiber. For a
40-channel layer with a 128-d condition this removes about two thirds of the flow's multiply-adds.
The inverse stays FrEIA's ``flow(z, c=[c], rev=True)``; tests check both passes agree.
"""

from __future__ import annotations

import torch
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from torch import nn
from torch.nn import functional as F


def _check_block(block: nn.Module) -> AllInOneBlock:
    """Refuse blocks whose options this pass does not reproduce."""
    if not isinstance(block, AllInOneBlock):
        msg = f"fiber_flow_forward supports AllInOneBlock steps only, got {type(block).__name__}."
        raise TypeError(msg)
    if block.GIN or block.householder or block.reverse_pre_permute or not block.conditional or block.input_rank != 0:
        msg = (
            "fiber_flow_forward supports conditional 1D AllInOneBlocks without GIN, Householder or reverse permutation."
        )
        raise ValueError(msg)
    if not isinstance(block.subnet, nn.Sequential) or not isinstance(block.subnet[0], nn.Linear):
        msg = "fiber_flow_forward needs subnets that start with nn.Linear (as built by linear_subnet)."
        raise ValueError(msg)
    return block


def fiber_condition_terms(flow: SequenceINN, condition_table: torch.Tensor) -> list[torch.Tensor]:
    """Per block, the condition part of the subnet's first layer, ``W_c·c + b`` for each table row: ``[T×hidden]``."""
    terms = []
    for module in flow.module_list:
        block = _check_block(module)
        first = block.subnet[0]
        terms.append(F.linear(condition_table, first.weight[:, block.splits[0] :], first.bias))
    return terms


def fiber_flow_forward(
    flow: SequenceINN,
    fibers: torch.Tensor,
    condition_table: torch.Tensor,
    condition_index: torch.Tensor,
    condition_terms: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a conditional ``fiber_flow`` on fibers ``N×C`` whose conditions are rows of a table.

    Args:
        flow: stack built by ``fiber_flow(..., condition_dim=P)``.
        fibers: ``N×C``.
        condition_table: ``T×P`` distinct condition vectors (e.g. one per feature-map position).
        condition_index: ``N`` (long), the table row of each fiber's condition.
        condition_terms: ``fiber_condition_terms(flow, condition_table)`` if already computed (inference cache).

    Returns:
        ``(z N×C, log|det J| N)``, equal to ``flow(fibers, c=[condition_table[condition_index]])``.
    """
    if condition_terms is None:
        condition_terms = fiber_condition_terms(flow, condition_table)
    x = fibers
    log_det = fibers.new_zeros(fibers.shape[0])
    for module, condition_term in zip(flow.module_list, condition_terms, strict=True):
        block = _check_block(module)
        first, rest = block.subnet[0], block.subnet[1:]
        x1, x2 = torch.split(x, block.splits, dim=1)
        hidden = F.linear(x1, first.weight[:, : block.splits[0]]) + condition_term[condition_index]
        coefficients = rest(hidden) * 0.1
        passive = block.splits[1]
        log_scale = block.clamp * torch.tanh(coefficients[:, :passive])
        x2 = x2 * torch.exp(log_scale) + coefficients[:, passive:]
        global_scale = block.global_scale_activation(block.global_scale)  # 1×C
        x = F.linear(torch.cat((x1, x2), dim=1) * global_scale + block.global_offset, block.w_perm)
        log_det = log_det + log_scale.sum(dim=1) + torch.log(global_scale).sum()
    return x, log_det

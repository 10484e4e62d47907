"""MC-SMoE's compression of merged experts, without its distillation: every merged expert matrix
W (out x in) becomes L R + S, L R its best rank-r approximation (SVD) and S the residual's
`sparse` fraction of rows, as in the paper's row-structured S (which needs no per-entry indices).
The paper ranks rows by their mean |theta * grad|; without gradients, moelab keeps the rows of
largest residual norm, the choice that minimises ||W - L R - S||_F. Transformers' formats hold
full matrices, so the result is written at full width; the factored size is what the method
would store (a matrix whose factors would be larger counted whole)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from moelab.hf.edit import LayerEdit


def compact_notes(edit: LayerEdit, compact: int) -> dict[str, int]:
    """The report's notes of a layer written at full width but smaller in its compact form
    (factored, or without its zeroed neurons): compact_parameters, the routed experts' gate, up
    and down in that form, and stored_parameters, as written."""
    experts = edit.view.experts
    stored = sum(getattr(experts, name).numel() for name in experts.matrices)
    return {"compact_parameters": compact, "stored_parameters": stored}


def check_rank_saves(option: str, rank: int, dim: int, hidden_dim: int, sparse: float = 0.0, where: str = "") -> None:
    """Refuse a rank whose factors (r (out + in) per matrix, plus the `sparse` fraction of its rows)
    would hold at least as many parameters as the hidden_dim x dim and dim x hidden_dim matrices
    themselves: nothing saved, and a worse approximation than the matrix as it is."""
    I, D = hidden_dim, dim
    most = min((o * i - 1 - int(round(sparse * o)) * i) // (I + D) for o, i in ((I, D), (D, I)))
    if rank > most:
        if most >= 1:
            fix = f"choose {option} <= {most}"
        elif (I * D - 1) // (I + D) >= 1:  # a rank saves without the rows
            fix = "lower mc_sparse (its rows alone fill the matrix)"
        else:
            fix = f"leave {option} unset (no rank saves on matrices this small)"
        raise ValueError(
            f"{where}{option}={rank} saves nothing on experts of {I} x {D}: the factors r ({I} + {D})"
            f"{f' and {sparse:g} of the rows' if sparse else ''} hold at least the matrix's {I * D} parameters; {fix}"
        )


def low_rank_sparse(edit: LayerEdit, rank: int, sparse: float) -> tuple[LayerEdit, int]:
    """The edit with its experts' gate (if gated), up and down replaced by rank-`rank` + sparse
    approximations; and their parameter count in compact form (r (out + in) + S's kept rows x in
    each, or out x in where that is smaller: the matrix stored as it is)."""
    if rank < 1 or not 0 <= sparse <= 1:
        raise ValueError(
            f"low-rank compression needs rank >= 1 and sparse in [0, 1], got {rank} and {sparse}"
        )
    experts = edit.view.experts
    replaced, parameters = {}, 0
    for name in experts.matrices:
        approximated = []
        for W in getattr(experts, name).double():
            approx, count = _approximate(W, rank, sparse)
            approximated.append(approx)
            parameters += count
        replaced[name] = torch.stack(approximated).to(getattr(experts, name).dtype)
    view = dataclasses.replace(edit.view, experts=dataclasses.replace(experts, **replaced))
    return LayerEdit(edit.sources, view=view), parameters


def _approximate(W: Tensor, rank: int, sparse: float) -> tuple[Tensor, int]:
    r = min(rank, *W.shape)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    low = (U[:, :r] * S[:r]) @ Vh[:r]
    residual = W - low
    rows = int(round(sparse * W.shape[0]))
    kept = residual.norm(dim=1).topk(rows).indices  # ties: torch's order
    low[kept] += residual[kept]
    return low, min(r * (W.shape[0] + W.shape[1]) + rows * W.shape[1], W.numel())

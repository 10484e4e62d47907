"""Mixture of Latent Experts (MoLE/MoLAE, arXiv 2503.23100): experts that share their projections.

Shape legend: T tokens, D model dim, R latent rank, E experts, I expert width.

RECONSTRUCTION: no public code exists and only the abstract was available; the equations follow
`research/architectures.md` §6.2. Each expert's SwiGLU is factorised through shared projections:

    z = A x                                   A: [R, D], shared by all experts (gate and up)
    E_i(x) = B_d^i (silu(B_g^i z) * B_u^i z)  B_g^i, B_u^i: [I, R], B_d^i: [R, I]
    y = A_out sum_i w_i E_i(x)                A_out: [D, R], shared

so the shared projections run once per token (before dispatch and after combine, which is
linear), and each expert costs 3*R*I instead of 3*D*I. One A feeds both the gate and the up
projection (the spec leaves open whether they have separate ones). The router sees x itself.
The experts are ordinary stacked experts of dim R; `MoELayer(latent=LatentProjection(D, R))`
wires it.
"""

from __future__ import annotations

from torch import Tensor, nn

from moelab.nn.linear import Linear


class LatentProjection(nn.Module):
    """The shared projections of a latent-expert layer: `down: Linear(D, R)`, `up: Linear(R, D)`."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        if not 1 <= rank <= dim:
            raise ValueError(f"latent rank must lie in [1, dim={dim}], got {rank}")
        self.dim, self.rank = dim, rank
        self.down_proj = Linear(dim, rank, bias=False)
        self.up_proj = Linear(rank, dim, bias=False)

    def down(self, x: Tensor) -> Tensor:
        """x: [T, D] -> z: [T, R]"""
        return self.down_proj(x)

    def up(self, z: Tensor) -> Tensor:
        """z: [T, R] -> [T, D]"""
        return self.up_proj(z)

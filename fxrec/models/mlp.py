"""Small dense building blocks shared by the models."""
from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Sequential):
    """Linear layers with ReLU between them.

    `final_activation=False` leaves the last layer linear (logit or projection heads).
    """

    def __init__(self, in_features: int, layer_sizes: list[int], final_activation: bool = True, device=None):
        if not layer_sizes:
            raise ValueError("MLP: layer_sizes must name at least one layer")
        layers: list[nn.Module] = []
        for i, out in enumerate(layer_sizes):
            layers.append(nn.Linear(in_features, out, device=device))
            if final_activation or i < len(layer_sizes) - 1:
                layers.append(nn.ReLU())
            in_features = out
        super().__init__(*layers)
        self.out_features = in_features


def dot_interaction(dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """DLRM's pairwise dot interaction.

    dense: B x D, sparse: B x F x D. Returns B x (D + (F+1)F/2): the dense vector
    followed by the strictly-upper-triangular dot products of all F+1 vectors, the
    layout of the reference DLRM (and TorchRec's InteractionArch).
    """
    b, d = dense.shape
    combined = torch.cat([dense.unsqueeze(1), sparse], dim=1)  # B x (F+1) x D
    products = torch.bmm(combined, combined.transpose(1, 2))  # B x (F+1) x (F+1)
    n = combined.shape[1]
    rows, cols = torch.triu_indices(n, n, offset=1, device=dense.device)
    return torch.cat([dense, products[:, rows, cols]], dim=1)


class LowRankCrossNet(nn.Module):
    """DCN-v2 cross layers with low-rank weights (Wang et al. 2021):

    x_{l+1} = x_0 * (W_l (V_l x_l) + b_l) + x_l, with V_l: in -> rank, W_l: rank -> in.
    """

    def __init__(self, in_features: int, num_layers: int, rank: int, device=None):
        super().__init__()
        if num_layers < 1 or rank < 1:
            raise ValueError(f"LowRankCrossNet: num_layers and rank must be >= 1, got {num_layers}, {rank}")
        self.V = nn.ModuleList(nn.Linear(in_features, rank, bias=False, device=device) for _ in range(num_layers))
        self.W = nn.ModuleList(nn.Linear(rank, in_features, bias=True, device=device) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for v, w in zip(self.V, self.W):
            x = x0 * w(v(x)) + x
        return x

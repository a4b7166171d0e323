"""DLRM (Naumov et al. 2019) and DLRM-DCN, in two spellings.

`DLRM` / `DLRM_DCN` take fxrec sparse types (an EmbeddingBagCollection fed a
KeyedJaggedTensor), laid out as TorchRec's models are. `DLRMPlain` / `DLRM_DCNPlain`
are written the way users of the reference DLRM script write it: a ModuleList of
`nn.EmbeddingBag` fed lists of offsets and indices. fxrec shards either spelling
unmodified; both return logits of shape B x 1.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fxrec.models.mlp import MLP, LowRankCrossNet, dot_interaction


def _common_dim(dims: list[int], what: str) -> int:
    if len(set(dims)) != 1:
        raise ValueError(f"{what}: every table must have the same embedding_dim for the interaction, got {dims}")
    return dims[0]


def _check_bottom(dense_arch_layer_sizes: list[int], dim: int) -> None:
    if dense_arch_layer_sizes[-1] != dim:
        raise ValueError(
            f"the bottom MLP must end in the embedding dim {dim} (it is interacted with the embeddings), "
            f"got dense_arch_layer_sizes={dense_arch_layer_sizes}"
        )


class _SparseArch(nn.Module):
    """EmbeddingBagCollection -> B x F x D (features in the collection's output order)."""

    def __init__(self, embedding_bag_collection: nn.Module):
        super().__init__()
        self.embedding_bag_collection = embedding_bag_collection
        configs = embedding_bag_collection.embedding_bag_configs()
        self.dim = _common_dim([c.embedding_dim for c in configs], "DLRM")
        self.num_features = sum(len(c.feature_names) for c in configs)

    def forward(self, features) -> torch.Tensor:
        pooled = self.embedding_bag_collection(features)
        return pooled.values().reshape(-1, self.num_features, self.dim)


class DLRM(nn.Module):
    """Bottom MLP on dense features, pairwise dot interaction, top MLP -> logit.

    forward(dense_features: B x dense_in_features, sparse_features: KeyedJaggedTensor) -> B x 1.
    """

    def __init__(self, embedding_bag_collection, dense_in_features: int, dense_arch_layer_sizes: list[int],
                 over_arch_layer_sizes: list[int], dense_device=None):
        super().__init__()
        self.sparse_arch = _SparseArch(embedding_bag_collection)
        _check_bottom(dense_arch_layer_sizes, self.sparse_arch.dim)
        self.dense_arch = MLP(dense_in_features, dense_arch_layer_sizes, device=dense_device)
        f, d = self.sparse_arch.num_features, self.sparse_arch.dim
        self.over_arch = MLP(d + f * (f + 1) // 2, over_arch_layer_sizes, final_activation=False, device=dense_device)

    def forward(self, dense_features: torch.Tensor, sparse_features) -> torch.Tensor:
        dense = self.dense_arch(dense_features)
        sparse = self.sparse_arch(sparse_features)
        return self.over_arch(dot_interaction(dense, sparse))


class DLRM_DCN(nn.Module):
    """DLRM whose interaction is a DCN-v2 low-rank cross network over
    [dense, flattened embeddings]."""

    def __init__(self, embedding_bag_collection, dense_in_features: int, dense_arch_layer_sizes: list[int],
                 over_arch_layer_sizes: list[int], dcn_num_layers: int = 3, dcn_low_rank_dim: int = 16,
                 dense_device=None):
        super().__init__()
        self.sparse_arch = _SparseArch(embedding_bag_collection)
        _check_bottom(dense_arch_layer_sizes, self.sparse_arch.dim)
        self.dense_arch = MLP(dense_in_features, dense_arch_layer_sizes, device=dense_device)
        width = self.sparse_arch.dim * (self.sparse_arch.num_features + 1)
        self.crossnet = LowRankCrossNet(width, dcn_num_layers, dcn_low_rank_dim, device=dense_device)
        self.over_arch = MLP(width, over_arch_layer_sizes, final_activation=False, device=dense_device)

    def forward(self, dense_features: torch.Tensor, sparse_features) -> torch.Tensor:
        dense = self.dense_arch(dense_features)
        sparse = self.sparse_arch(sparse_features)
        x = torch.cat([dense, sparse.flatten(1)], dim=1)
        return self.over_arch(self.crossnet(x))


def _plain_tables(num_embeddings_per_feature: list[int], dim: int, device) -> nn.ModuleList:
    tables = nn.ModuleList()
    for n in num_embeddings_per_feature:
        bag = nn.EmbeddingBag(n, dim, mode="sum", device=device)
        if bag.weight.device.type != "meta":
            # The reference script's init; equal to fxrec's EmbeddingBagCollection default.
            bound = math.sqrt(1.0 / n)
            nn.init.uniform_(bag.weight, -bound, bound)
        tables.append(bag)
    return tables


class DLRMPlain(nn.Module):
    """DLRM as the reference script writes it.

    forward(dense_x: B x dense_in, lS_o: list of B offsets per table, lS_i: list of ids per table).
    """

    def __init__(self, num_embeddings_per_feature: list[int], embedding_dim: int, dense_in_features: int,
                 dense_arch_layer_sizes: list[int], over_arch_layer_sizes: list[int], device=None):
        super().__init__()
        _check_bottom(dense_arch_layer_sizes, embedding_dim)
        self.emb_l = _plain_tables(num_embeddings_per_feature, embedding_dim, device)
        self.bot_l = MLP(dense_in_features, dense_arch_layer_sizes)
        f = len(num_embeddings_per_feature)
        self.top_l = MLP(embedding_dim + f * (f + 1) // 2, over_arch_layer_sizes, final_activation=False)

    def forward(self, dense_x, lS_o, lS_i):
        x = self.bot_l(dense_x)
        ly = []
        for k, sparse_index_group_batch in enumerate(lS_i):
            sparse_offset_group_batch = lS_o[k]
            E = self.emb_l[k]
            ly.append(E(sparse_index_group_batch, sparse_offset_group_batch))
        z = dot_interaction(x, torch.stack(ly, dim=1))
        return self.top_l(z)


class DLRM_DCNPlain(nn.Module):
    """DLRM-DCN over a ModuleList of nn.EmbeddingBag; same inputs as DLRMPlain."""

    def __init__(self, num_embeddings_per_feature: list[int], embedding_dim: int, dense_in_features: int,
                 dense_arch_layer_sizes: list[int], over_arch_layer_sizes: list[int], dcn_num_layers: int = 3,
                 dcn_low_rank_dim: int = 16, device=None):
        super().__init__()
        _check_bottom(dense_arch_layer_sizes, embedding_dim)
        self.emb_l = _plain_tables(num_embeddings_per_feature, embedding_dim, device)
        self.bot_l = MLP(dense_in_features, dense_arch_layer_sizes)
        width = embedding_dim * (len(num_embeddings_per_feature) + 1)
        self.crossnet = LowRankCrossNet(width, dcn_num_layers, dcn_low_rank_dim)
        self.top_l = MLP(width, over_arch_layer_sizes, final_activation=False)

    def forward(self, dense_x, lS_o, lS_i):
        x = self.bot_l(dense_x)
        ly = [self.emb_l[k](lS_i[k], lS_o[k]) for k in range(len(lS_i))]
        z = torch.cat([x] + ly, dim=1)
        return self.top_l(self.crossnet(z))

"""Two-tower retrieval (query tower, candidate tower, in-batch softmax), in two spellings.

`TwoTower` reads an EmbeddingBagCollection: query features and candidate features may
share a table (an item table feeding both the candidate id and the user's history).
`TwoTowerPlain` is written with bare `nn.Embedding`s: a user table and one item table
read twice (candidate ids, and the user's padded history, masked-mean pooled).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxrec.models.mlp import MLP
from fxrec.modules import embedding_names


def in_batch_softmax_loss(query: torch.Tensor, candidate: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Sampled softmax with the batch's other candidates as negatives.

    Row i's positive is candidate i. Embeddings are L2-normalised, so logits are cosine
    similarities over `temperature`.
    """
    if query.shape != candidate.shape:
        raise ValueError(f"query {tuple(query.shape)} and candidate {tuple(candidate.shape)} embeddings differ in shape")
    logits = F.normalize(query, dim=-1) @ F.normalize(candidate, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(query.shape[0], device=query.device))


class TwoTower(nn.Module):
    """forward(features: KeyedJaggedTensor holding query and candidate features)
    -> (query_embedding B x out, candidate_embedding B x out)."""

    def __init__(self, embedding_bag_collection, query_features: list[str], candidate_features: list[str],
                 layer_sizes: list[int], device=None):
        super().__init__()
        self.embedding_bag_collection = embedding_bag_collection
        dims = {}  # by the collection's output key: the feature, or "feature@table" for a shared one
        configs = embedding_bag_collection.embedding_bag_configs()
        for cfg, keys in zip(configs, embedding_names(configs)):
            for key in keys:
                dims[key] = cfg.embedding_dim
        for f in list(query_features) + list(candidate_features):
            if f not in dims:
                raise ValueError(f"TwoTower: feature {f!r} is no output of the collection (its outputs: "
                                 f"{sorted(dims)}; a feature several tables read is named 'feature@table')")
        self.query_features = list(query_features)
        self.candidate_features = list(candidate_features)
        self.query_proj = MLP(sum(dims[f] for f in query_features), layer_sizes, final_activation=False, device=device)
        self.candidate_proj = MLP(sum(dims[f] for f in candidate_features), layer_sizes, final_activation=False,
                                  device=device)

    def forward(self, features):
        pooled = self.embedding_bag_collection(features).to_dict()
        query = torch.cat([pooled[f] for f in self.query_features], dim=1)
        candidate = torch.cat([pooled[f] for f in self.candidate_features], dim=1)
        return self.query_proj(query), self.candidate_proj(candidate)


class TwoTowerPlain(nn.Module):
    """forward(user_ids B, history B x L (padded), history_lengths B, item_ids B)
    -> (query_embedding, candidate_embedding). The item table is shared by both towers."""

    def __init__(self, num_users: int, num_items: int, embedding_dim: int, layer_sizes: list[int], device=None):
        super().__init__()
        self.user = nn.Embedding(num_users, embedding_dim, device=device)
        self.item = nn.Embedding(num_items, embedding_dim, device=device)
        self.query_proj = MLP(2 * embedding_dim, layer_sizes, final_activation=False, device=device)
        self.candidate_proj = MLP(embedding_dim, layer_sizes, final_activation=False, device=device)

    def forward(self, user_ids, history, history_lengths, item_ids):
        positions = torch.arange(history.shape[1], device=history.device)
        mask = (positions.unsqueeze(0) < history_lengths.unsqueeze(1)).to(self.item.weight.dtype)
        summed = (self.item(history) * mask.unsqueeze(-1)).sum(dim=1)
        pooled = summed / history_lengths.clamp(min=1).unsqueeze(1).to(summed.dtype)
        query = torch.cat([self.user(user_ids), pooled], dim=1)
        return self.query_proj(query), self.candidate_proj(self.item(item_ids))

"""Small models in the styles users write, each with a generator of random batches.

`CASES[name].make(seed)` returns ``(model, example_inputs)``; ``.inputs(seed)`` draws a
fresh batch for the same model. The module-level functions of the same names return
``(model, example_inputs)`` so that ``fxrec dump tests/models_zoo.py:<name>`` works.
Shapes are tiny: these are for structure and numerics, not speed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig
from fxrec.sparse import KeyedJaggedTensor

BATCH = 4


def _mlp(sizes: list[int], last_sigmoid: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n, m) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n, m))
        layers.append(nn.Sigmoid() if (last_sigmoid and i == len(sizes) - 2) else nn.ReLU())
    return nn.Sequential(*layers)


def _bags(g: torch.Generator, rows: int, batch: int, max_len: int = 3):
    """(ids, offsets) of `batch` bags with 0..max_len ids each."""
    lengths = torch.randint(0, max_len + 1, (batch,), generator=g)
    offsets = lengths.cumsum(0) - lengths  # no bag, no offset: an empty batch has none
    return torch.randint(0, rows, (int(lengths.sum()),), generator=g), offsets


# ------------------------------------------------------------------ DLRM, dlrm_s_pytorch style
class DLRMLists(nn.Module):
    """DLRM as facebookresearch/dlrm writes it: a ModuleList of nn.EmbeddingBag read in a
    loop over lists of per-table offsets and indices, a dot interaction between MLPs."""

    def __init__(self, m_spa=8, ln_emb=(20, 30, 40), ln_bot=(4, 16, 8), ln_top=(14, 16, 1)):
        super().__init__()
        self.emb_l = nn.ModuleList([nn.EmbeddingBag(n, m_spa, mode="sum") for n in ln_emb])
        self.bot_l = _mlp(list(ln_bot))
        self.top_l = _mlp(list(ln_top), last_sigmoid=True)
        num_fea = len(ln_emb) + 1
        li, lj = torch.tril_indices(num_fea, num_fea, offset=-1)
        self.register_buffer("li", li, persistent=False)
        self.register_buffer("lj", lj, persistent=False)

    def apply_emb(self, lS_o, lS_i, emb_l):
        ly = []
        for k, sparse_index_group_batch in enumerate(lS_i):
            sparse_offset_group_batch = lS_o[k]
            E = emb_l[k]
            V = E(sparse_index_group_batch, sparse_offset_group_batch)
            ly.append(V)
        return ly

    def interact_features(self, x, ly):
        (batch_size, d) = x.shape
        T = torch.cat([x] + ly, dim=1).view((batch_size, -1, d))
        Z = torch.bmm(T, torch.transpose(T, 1, 2))
        Zflat = Z[:, self.li, self.lj]
        return torch.cat([x] + [Zflat], dim=1)

    def forward(self, dense_x, lS_o, lS_i):
        x = self.bot_l(dense_x)
        ly = self.apply_emb(lS_o, lS_i, self.emb_l)
        z = self.interact_features(x, ly)
        return self.top_l(z)


def _dlrm_lists_inputs(g, batch=BATCH):
    pairs = [_bags(g, n, batch) for n in (20, 30, 40)]
    return torch.randn(batch, 4, generator=g), [o for _, o in pairs], [i for i, _ in pairs]


# ------------------------------------------------------------------ DLRM on fxrec EBC + KJT
class SparseArch(nn.Module):
    def __init__(self):
        super().__init__()
        self.ebc = EmbeddingBagCollection([
            EmbeddingBagConfig("t_user", 20, 8, ["user"]),
            EmbeddingBagConfig("t_item", 50, 8, ["item", "last_item"]),  # one table, two features
            EmbeddingBagConfig("t_cat", 10, 8, ["cat"], pooling="mean"),
        ])

    def forward(self, kjt):
        return self.ebc(kjt)


class DLRMEBC(nn.Module):
    def __init__(self):
        super().__init__()
        self.bot = _mlp([4, 16, 8])
        self.sparse_arch = SparseArch()
        self.top = _mlp([8 + 10, 16, 1], last_sigmoid=True)
        li, lj = torch.tril_indices(5, 5, offset=-1)
        self.register_buffer("li", li, persistent=False)
        self.register_buffer("lj", lj, persistent=False)

    def forward(self, dense, kjt):
        x = self.bot(dense)
        kt = self.sparse_arch(kjt)
        t = torch.cat([x.unsqueeze(1), kt.values().view(x.shape[0], 4, 8)], dim=1)
        z = torch.bmm(t, t.transpose(1, 2))[:, self.li, self.lj]
        return self.top(torch.cat([x, z], dim=1))


def _kjt(g, rows: dict, batch=BATCH, weighted=False, max_len=3):
    lengths = torch.randint(0, max_len + 1, (len(rows) * batch,), generator=g)
    per_key = lengths.view(len(rows), batch).sum(1).tolist()
    values = torch.cat([torch.randint(0, n, (k,), generator=g) for n, k in zip(rows.values(), per_key)])
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor(list(rows), values, lengths=lengths, weights=weights)


def _dlrm_ebc_inputs(g, batch=BATCH):
    return torch.randn(batch, 4, generator=g), _kjt(g, {"user": 20, "item": 50, "last_item": 50, "cat": 10}, batch)


# ------------------------------------------------------------------ two towers, shared item table
class UserTower(nn.Module):
    def __init__(self, user: nn.Embedding, item: nn.Embedding, d: int):
        super().__init__()
        self.user, self.item = user, item
        self.mlp = _mlp([2 * d, d, d])

    def forward(self, user_id, history):
        # mean over the padded history: nn.Embedding followed by .mean(dim=1)
        return self.mlp(torch.cat([self.user(user_id), self.item(history).mean(dim=1)], dim=1))


class ItemTower(nn.Module):
    def __init__(self, item: nn.Embedding, d: int):
        super().__init__()
        self.item = item
        self.mlp = _mlp([d, d, d])

    def forward(self, item_id):
        return self.mlp(self.item(item_id))


class TwoTower(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        item = nn.Embedding(50, d)  # shared: the user's history and the candidate item
        self.user_tower = UserTower(nn.Embedding(20, d), item, d)
        self.item_tower = ItemTower(item, d)

    def forward(self, user_id, history, item_id):
        return (self.user_tower(user_id, history) * self.item_tower(item_id)).sum(-1)


def _two_tower_inputs(g, batch=BATCH):
    return (torch.randint(0, 20, (batch,), generator=g), torch.randint(0, 50, (batch, 5), generator=g),
            torch.randint(0, 50, (batch,), generator=g))


# ------------------------------------------------------------------ unpooled: attention over tokens
class SeqAttention(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.tok = nn.Embedding(30, d, padding_idx=0)
        nn.init.normal_(self.tok.weight)  # the padding row too: lookups must read it as it is
        self.pos = nn.Embedding(6, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.out = nn.Linear(d, 1)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.tok(tokens) + self.pos(positions)
        a, _ = self.attn(h, h, h)
        return self.out(a.mean(dim=1))


class NoTables(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = _mlp([6, 16, 1])

    def forward(self, x):
        return self.mlp(x)


# ------------------------------------------------------------------ bag variants
class WeightedBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(40, 8, mode="sum")
        self.lin = nn.Linear(8, 1)

    def forward(self, ids, offsets, weights):
        return self.lin(self.bag(ids, offsets, per_sample_weights=weights))


def _weighted_inputs(g, batch=BATCH):
    ids, offsets = _bags(g, 40, batch)
    return ids, offsets, torch.rand(ids.numel(), generator=g)


class Bag2D(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(40, 8, mode="mean")

    def forward(self, ids):
        return self.bag(ids)  # 2-D ids: every row is a bag, no offsets


class ParamTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(40, 8))

    def forward(self, ids, offsets):
        return F.embedding_bag(ids, self.weight, offsets, mode="sum")


class FunctionalBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.sparse = ParamTable()
        self.lin = nn.Linear(8, 1)

    def forward(self, ids, offsets):
        return self.lin(self.sparse(ids, offsets))


class FunctionalEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(40, 8))

    def forward(self, history):
        return F.embedding(history, self.table).sum(dim=1)


class TableDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.tables = nn.ModuleDict({"user": nn.Embedding(20, 8), "genre": nn.EmbeddingBag(10, 8, mode="mean")})

    def forward(self, features: dict):
        outs = [emb(features[name]) for name, emb in self.tables.items()]
        return torch.cat(outs, dim=1)


def _table_dict_inputs(g, batch=BATCH):
    return ({"user": torch.randint(0, 20, (batch,), generator=g),
             "genre": torch.randint(0, 10, (batch, 3), generator=g)},)


class SequenceEC(nn.Module):
    def __init__(self):
        super().__init__()
        self.ec = EmbeddingCollection([EmbeddingConfig("t_item", 30, 8, ["hist", "clicks"]),
                                       EmbeddingConfig("t_query", 15, 8, ["query"])])

    def forward(self, kjt):
        seqs = self.ec(kjt)
        pooled = [seqs[f].to_padded_dense(desired_length=3).sum(dim=1) for f in ("hist", "clicks", "query")]
        return torch.cat(pooled, dim=1)


# ------------------------------------------------------------------ capture edge cases
class ShapeBranch(nn.Module):
    """Control flow on a tensor's rank: fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(30, 8, mode="sum")
        self.table = nn.Parameter(torch.randn(30, 8))
        self.lin = nn.Linear(4 + 16, 1)

    def forward(self, dense, ids, offsets, history):
        if dense.dim() == 3:
            dense = dense.flatten(1)
        pooled = self.bag(ids, offsets)
        hist = F.embedding(history, self.table).sum(dim=1)
        return self.lin(torch.cat([dense, pooled, hist], dim=1))


def _shape_branch_inputs(g, batch=BATCH):
    ids, offsets = _bags(g, 30, batch)
    return torch.randn(batch, 4, generator=g), ids, offsets, torch.randint(0, 30, (batch, 3), generator=g)


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # branches on a value: neither fx nor export can capture this
            return x * 2
        return -x


class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(30, 8, mode="sum")
        self.gate = Gate()

    def forward(self, ids, offsets):
        return self.gate(self.bag(ids, offsets))


# ------------------------------------------------------------------ the table of cases
@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    draw: Callable[[torch.Generator], tuple]

    def inputs(self, seed: int) -> tuple:
        return self.draw(torch.Generator().manual_seed(seed))

    def make(self, seed: int = 0):
        torch.manual_seed(seed)
        return self.build(), self.inputs(seed)


CASES = {c.name: c for c in [
    Case("dlrm_lists", DLRMLists, _dlrm_lists_inputs),
    Case("dlrm_ebc", DLRMEBC, _dlrm_ebc_inputs),
    Case("two_tower", TwoTower, _two_tower_inputs),
    Case("seq_attention", SeqAttention, lambda g: (torch.randint(0, 30, (BATCH, 6), generator=g),)),
    Case("no_tables", NoTables, lambda g: (torch.randn(BATCH, 6, generator=g),)),
    Case("weighted_bag", WeightedBag, _weighted_inputs),
    Case("bag_2d", Bag2D, lambda g: (torch.randint(0, 40, (BATCH, 3), generator=g),)),
    Case("functional_bag", FunctionalBag, lambda g: _bags(g, 40, BATCH)),
    Case("functional_embedding", FunctionalEmbedding, lambda g: (torch.randint(0, 40, (BATCH, 5), generator=g),)),
    Case("table_dict", TableDict, _table_dict_inputs),
    Case("sequence_ec", SequenceEC, lambda g: (_kjt(g, {"hist": 30, "clicks": 30, "query": 15}),)),
    Case("shape_branch", ShapeBranch, _shape_branch_inputs),
    Case("value_branch", ValueBranch, lambda g: _bags(g, 30, BATCH)),
]}


def dlrm_lists():
    return CASES["dlrm_lists"].make()


def dlrm_ebc():
    return CASES["dlrm_ebc"].make()


def two_tower():
    return CASES["two_tower"].make()


def seq_attention():
    return CASES["seq_attention"].make()


def no_tables():
    return CASES["no_tables"].make()


def value_branch():
    return CASES["value_branch"].make()

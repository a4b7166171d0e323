"""Plain data shared by the front end and the planner.

`TableInfo` is what the front end records for each embedding table it finds and what
the planner consumes; users may also build it by hand to plan without a model.
"""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch

POOLINGS = ("sum", "mean", "none")
# comm_dtype's names (fxrec.shard, fxrec.plan): the dtype the sharded tables' results and
# their gradients travel between ranks in
WIRE_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
               "fp32": torch.float32, "float32": torch.float32}


def wire_dtype(value, owner: str) -> Optional[torch.dtype]:
    """A comm_dtype as a torch dtype (None stays None); anything else is a ValueError that
    names `owner` (the function given it) and the value."""
    if value is None:
        return None
    if isinstance(value, torch.dtype) and value in WIRE_DTYPES.values():
        return value
    if isinstance(value, str) and value in WIRE_DTYPES:
        return WIRE_DTYPES[value]
    raise ValueError(f"{owner}: comm_dtype must be one of {sorted(WIRE_DTYPES)} or torch.bfloat16 / "
                     f"torch.float16 / torch.float32, got {value!r}")


def whole(value) -> Optional[int]:
    """`value` as an int when it is a whole number (an integer, numpy's and torch's
    included, or a finite real without a fraction: 1e6, 10.0), else None (1.5, inf, a bool, a string): counts are refused by
    their callers, never truncated."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if not isinstance(value, numbers.Real):
        try:  # what indexes as an int: a numpy or torch integer scalar, an int tensor of one value
            return operator.index(value)
        except TypeError:
            return None
    return int(value) if math.isfinite(value) and value == int(value) else None


@dataclass
class TableInfo:
    """One embedding table as the compiler sees it.

    name: the path of the module that owns the table (``emb_l.0``, ``user``) or, for a
    bare parameter read by ``F.embedding*``, the parameter's path.
    pooling_factor: mean number of ids per bag, measured on the example batch. An unpooled
    lookup's bag is a sample's sequence (an EmbeddingCollection feature's lengths entry, a
    row of ``batch x seq`` ids), each of whose ids is its own output row, so a history of
    50 ids per sample has factor 50; 1-D ids, with no batch structure, have factor 1.0.
    uses: how many features (lookups) read the table; each gives every sample a bag of it.
    bags_per_sample: how many bags of the table one sample makes, summed over its uses.
    None (the default) means `uses`: every sample has its own bag of each feature. A
    feature with a batch of its own (TorchRec's variable batch per feature, VBE: a
    KeyedJaggedTensor's ``stride_per_key_per_rank``) contributes its bags over the batch's
    samples instead, e.g. 2 bags for a batch of 8 contribute 0.25, since the
    EmbeddingBagCollection looks up, exchanges and pools each bag once and expands the
    pooled sums to the samples only at the end (an EmbeddingCollection looks each up once
    and does not expand). The planner charges lookups, ids and
    output exchanges per bag (`fxrec.planner.cost`).
    """

    name: str
    num_embeddings: int
    embedding_dim: int
    pooling_factor: float = 1.0
    dtype: torch.dtype = torch.float32
    pooling: str = "sum"
    uses: int = 1
    # Filled by the front end: the lookup nodes' names and the features that feed them.
    features: list[str] = field(default_factory=list)
    bags_per_sample: Optional[float] = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"TableInfo: name must be a non-empty string, got {self.name!r}")
        for key in ("num_embeddings", "embedding_dim", "uses"):
            count = whole(getattr(self, key))
            if count is None:
                raise ValueError(f"table {self.name!r}: {key} must be a whole number, got {getattr(self, key)!r}")
            setattr(self, key, count)
        if self.num_embeddings <= 0:
            raise ValueError(f"table {self.name!r}: num_embeddings must be positive, got {self.num_embeddings}")
        if self.embedding_dim <= 0:
            raise ValueError(f"table {self.name!r}: embedding_dim must be positive, got {self.embedding_dim}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"table {self.name!r}: pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not (isinstance(self.pooling_factor, numbers.Real) and 0 <= self.pooling_factor < math.inf):
            raise ValueError(f"table {self.name!r}: pooling_factor must be a finite number >= 0, "
                             f"got {self.pooling_factor!r}")
        if self.uses < 1:
            raise ValueError(f"table {self.name!r}: uses must be >= 1, got {self.uses}")
        if self.bags_per_sample is not None:
            bags = self.bags_per_sample
            if isinstance(bags, bool) or not (isinstance(bags, numbers.Real) and 0 <= bags < math.inf):
                raise ValueError(f"table {self.name!r}: bags_per_sample must be a finite number >= 0 (or None for "
                                 f"one bag per use), got {bags!r}")
            self.bags_per_sample = float(bags)
        if isinstance(self.dtype, str):
            dtype = getattr(torch, self.dtype, None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"table {self.name!r}: unknown dtype {self.dtype!r} (e.g. 'float32', 'float16')")
            self.dtype = dtype
        elif not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"table {self.name!r}: dtype must be a torch.dtype or its name, got {self.dtype!r}")
        self.pooling_factor = float(self.pooling_factor)
        if isinstance(self.features, str):  # it would read as one feature per character
            raise ValueError(f"table {self.name!r}: features must be a list of names, got the string {self.features!r}")

    @property
    def element_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def weight_bytes(self) -> int:
        return self.num_embeddings * self.embedding_dim * self.element_bytes

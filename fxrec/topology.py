"""The machines a model is planned for: ranks, nodes, memory and bandwidths.

A `Topology` is plain data. Fields left as ``None`` take the documented defaults of the
device kind (`DEFAULTS`), so ``Topology(128, device="cuda")`` describes 16 nodes of
8 H100-class GPUs. `Topology.from_env()` reads the launcher's environment and the
device; `Topology.load(path)` reads a profile written by ``fxrec bench calibrate``.

Units: bytes for memory, bytes per second for bandwidths.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from fxrec.types import whole

DEVICES = ("cpu", "cuda")

GiB = 1 << 30

# Defaults per device kind. Bandwidths are per rank and per direction.
#  cuda: an H100 SXM-class GPU: 80 GiB HBM3 at 3.35 TB/s, NVLink 4 within a node
#        (900 GB/s bidirectional = 450 GB/s each way), one 400 Gb/s NIC per GPU
#        between nodes (50 GB/s), 8 GPUs and 2 TiB of host memory per node.
#  cpu:  one rank per process on a single host; DRAM share of 50 GB/s, gloo over
#        shared memory / loopback at about 5 GB/s, 100 Gb/s Ethernet between hosts.
DEFAULTS = {
    "cuda": dict(
        ranks_per_node=8,
        memory_per_rank=80 * GiB,
        host_memory_per_rank=256 * GiB,
        hbm_bandwidth=3.35e12,
        intra_node_bandwidth=450e9,
        inter_node_bandwidth=50e9,
    ),
    "cpu": dict(
        ranks_per_node=None,  # all ranks on one host
        memory_per_rank=64 * GiB,
        host_memory_per_rank=64 * GiB,
        hbm_bandwidth=50e9,
        intra_node_bandwidth=5e9,
        inter_node_bandwidth=12.5e9,
    ),
}

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(value, what: str = "memory") -> int:
    """Turn 80e9, "80GB" (SI, 10^9) or "80GiB" (2^30) into a positive int of bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{what}: cannot read {value!r} as a size (e.g. 80GB, 512MiB, 1e9)")
        number, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(number * _UNITS[unit]):
        raise ValueError(f"{what}: {value!r} is not a finite size")
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{what}: must be positive, got {value!r}")
    return size


def _positive(name: str, value) -> float:
    """A bandwidth: a positive finite number (inf would make every transfer free, and a
    profile's JSON may hold Infinity)."""
    try:
        number = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not 0 < number < math.inf:
        raise ValueError(f"Topology: {name} must be a positive finite number (bytes/s), got {value!r}")
    return number


def _positive_int(name: str, value) -> int:
    """A count: a positive integer (2.0 reads as 2; None, lists and strings are refused by name)."""
    count = whole(value)
    if count is None or count < 1:
        raise ValueError(f"Topology: {name} must be a positive integer, got {value!r}")
    return count


@dataclass
class Topology:
    """World size, ranks per node, device kind, per-rank memory and bandwidths.

    Guarantees after construction: every field is set (defaults filled in from
    `DEFAULTS[device]`), ``world_size`` is a multiple of ``ranks_per_node`` (the last
    node is never partial), memories are ints of bytes and bandwidths positive floats.
    ``memory_per_rank`` is what the planner may fill with embedding shards.
    """

    world_size: int
    ranks_per_node: int | None = None
    device: str = "cpu"
    memory_per_rank: int | str | None = None
    host_memory_per_rank: int | str | None = None
    hbm_bandwidth: float | None = None
    intra_node_bandwidth: float | None = None
    inter_node_bandwidth: float | None = None

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"Topology: device must be one of {DEVICES}, got {self.device!r}")
        self.world_size = _positive_int("world_size", self.world_size)
        defaults = DEFAULTS[self.device]
        rpn = self.ranks_per_node
        if rpn is None:
            rpn = min(self.world_size, defaults["ranks_per_node"] or self.world_size)
        rpn = _positive_int("ranks_per_node", rpn)
        if self.world_size % rpn:
            raise ValueError(f"Topology: world_size {self.world_size} is not a multiple of "
                             f"ranks_per_node {rpn}")
        self.ranks_per_node = rpn
        for name in ("memory_per_rank", "host_memory_per_rank"):
            value = getattr(self, name)
            setattr(self, name, parse_bytes(defaults[name] if value is None else value, f"Topology: {name}"))
        for name in ("hbm_bandwidth", "intra_node_bandwidth", "inter_node_bandwidth"):
            value = getattr(self, name)
            setattr(self, name, _positive(name, defaults[name] if value is None else value))

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def node_ranks(self, node: int) -> range:
        return range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node)

    @property
    def ring_bandwidth(self) -> float:
        """Per-rank bandwidth of a ring collective over all ranks (all-reduce,
        reduce-scatter): the slowest link it crosses."""
        if self.num_nodes > 1:
            return min(self.inter_node_bandwidth, self.intra_node_bandwidth)
        return self.intra_node_bandwidth

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, **overrides) -> "Topology":
        """Build from a dict (a profile); unknown keys are ignored, ``overrides``
        (those not None) replace the dict's values."""
        if not isinstance(data, Mapping):
            raise TypeError(f"Topology.from_dict: data must be a dict (a profile), got {type(data).__name__} {data!r}")
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        if "world_size" not in kwargs:
            raise ValueError("Topology: profile has no world_size and none was given")
        return cls(**kwargs)

    def save(self, path: str, **extra) -> None:
        """Write this topology (plus ``extra`` keys, e.g. measurement details) as JSON."""
        with open(path, "w") as f:
            json.dump({**self.to_dict(), **extra}, f, indent=2)

    @classmethod
    def load(cls, path: str, **overrides) -> "Topology":
        """Read a JSON profile (``fxrec bench calibrate`` writes one). Keyword
        overrides replace fields, e.g. ``world_size=128`` to plan a larger job with the
        bandwidths measured on a small one."""
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"Topology.load: no such file {path!r}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"Topology.load: {path!r} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"Topology.load: {path!r} must hold a JSON object")
        return cls.from_dict(data, **overrides)

    @classmethod
    def from_env(cls, device: str | None = None, **overrides) -> "Topology":
        """The topology of the running job.

        World size and ranks per node are the overrides', else come from the
        initialised torch.distributed group, else from torchrun's WORLD_SIZE /
        LOCAL_WORLD_SIZE (1 / the world size when unset; ValueError naming the variable
        when not a positive integer). Memory per rank is the GPU's total memory (cuda)
        or the host's physical memory shared by the node's ranks (cpu; the ranks per
        node after overrides). Bandwidths keep the device defaults unless overridden
        (or use `load` with a calibrated profile).
        """
        import torch

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        overrides = {k: v for k, v in overrides.items() if v is not None}
        # the sizes first, overrides included: the memory split below depends on them
        world_size = overrides.pop("world_size", None)
        if world_size is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            world_size = torch.distributed.get_world_size()
        if world_size is None:
            world_size = _env_int("WORLD_SIZE", 1)
        rpn = overrides.pop("ranks_per_node", None)
        if rpn is None:
            rpn = _env_int("LOCAL_WORLD_SIZE", world_size)
        kwargs = dict(world_size=world_size, ranks_per_node=rpn, device=device)
        if device == "cuda" and torch.cuda.is_available():
            local_rank = _env_int("LOCAL_RANK", 0, least=0) % torch.cuda.device_count()
            kwargs["memory_per_rank"] = torch.cuda.get_device_properties(local_rank).total_memory
        elif device == "cpu" and (per_node := whole(rpn) or 0) >= 1:
            # a bad ranks_per_node is left for the constructor to name
            kwargs["memory_per_rank"] = _host_memory() // per_node
            kwargs["host_memory_per_rank"] = kwargs["memory_per_rank"]
        kwargs.update(overrides)
        return cls(**kwargs)


def _env_int(name: str, default: int, least: int = 1) -> int:
    """The launcher's variable ``name`` as an int of at least ``least`` (``default`` when
    unset); a ValueError naming the variable and its value otherwise."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < least:
        kind = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise ValueError(f"Topology.from_env: {name}={raw!r} is not {kind}")
    return value


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: fall back to the default
        return DEFAULTS["cpu"]["memory_per_rank"]

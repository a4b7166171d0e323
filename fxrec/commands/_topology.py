"""Topology options shared by `fxrec plan` and `fxrec dump`."""
from __future__ import annotations


def add_topology_arguments(group) -> None:
    """--world-size, --ranks-per-node, --device, --memory, --topology, --batch-size, --constraint."""
    group.add_argument("--world-size", type=int, help="number of ranks (default: the profile's)")
    group.add_argument("--ranks-per-node", type=int, help="ranks per node (default: 8 for cuda, all for cpu)")
    group.add_argument("--device", choices=("cpu", "cuda"), help="device kind (default: the profile's, else cpu)")
    group.add_argument("--memory", help="memory per rank for embeddings, e.g. 80GB or 64GiB")
    group.add_argument("--topology", metavar="PROFILE", help="topology profile JSON (fxrec bench calibrate)")
    group.add_argument("--batch-size", type=int, default=512, help="per-rank batch size for the costs (default 512)")
    group.add_argument("--constraint", action="append", default=[], metavar="TABLE=TYPE[,TYPE]",
                       help="allowed sharding types of a table (repeatable)")


def given_topology(args) -> dict:
    """The topology fields the options set (None where not given)."""
    return dict(world_size=args.world_size, ranks_per_node=args.ranks_per_node, device=args.device,
                memory_per_rank=args.memory)


def topology_from_args(args, given: dict):
    """Topology.load(--topology, overrides) or Topology(**given); the caller checks that
    a world size is there when it needs one."""
    from fxrec.topology import Topology
    if args.topology:
        return Topology.load(args.topology, **given)
    return Topology(**{k: v for k, v in given.items() if v is not None})

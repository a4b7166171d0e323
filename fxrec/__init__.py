"""fxrec: hand over the model you already have.

The public contract (../shared/DESIGN.md). Names resolve lazily so that
`import fxrec` stays cheap and each subsystem loads only when used.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "JaggedTensor": "fxrec.sparse",
    "KeyedJaggedTensor": "fxrec.sparse",
    "KeyedTensor": "fxrec.sparse",
    "EmbeddingBagConfig": "fxrec.modules",
    "EmbeddingConfig": "fxrec.modules",
    "EmbeddingBagCollection": "fxrec.modules",
    "EmbeddingCollection": "fxrec.modules",
    "FeatureProcessedEmbeddingBagCollection": "fxrec.feature_processors",
    "PositionWeightedModule": "fxrec.feature_processors",
    "PositionWeightedModuleCollection": "fxrec.feature_processors",
    "ManagedCollisionCollection": "fxrec.managed_collision",
    "ManagedCollisionEmbeddingBagCollection": "fxrec.managed_collision",
    "ManagedCollisionEmbeddingCollection": "fxrec.managed_collision",
    "MCHManagedCollisionModule": "fxrec.managed_collision",
    "DistanceLFU_EvictionPolicy": "fxrec.managed_collision",
    "LFU_EvictionPolicy": "fxrec.managed_collision",
    "LRU_EvictionPolicy": "fxrec.managed_collision",
    "TableInfo": "fxrec.types",
    "Topology": "fxrec.topology",
    "CaptureError": "fxrec.capture",
    "plan": "fxrec.planner.plan",
    "Plan": "fxrec.planner.plan",
    "TablePlan": "fxrec.planner.plan",
    "Shard": "fxrec.planner.plan",
    "Constraint": "fxrec.planner.plan",
    "PlanError": "fxrec.planner.plan",
    "ShardedModel": "fxrec.shard",
    "lower_for_inference": "fxrec.lowering.inference",
}
_SUBMODULES = ("optim", "models", "datasets", "metrics", "passes", "planner", "lowering", "runtime")
# public submodule name -> where it lives (DESIGN.md's layout keeps checkpointing in runtime/)
_ALIASES = {"checkpoint": "fxrec.runtime.checkpoint"}

__all__ = sorted(list(_EXPORTS) + ["capture", "find_tables", "shard"]) + list(_SUBMODULES) + list(_ALIASES)

# Bound eagerly: `fxrec.capture` and `fxrec.shard` name both a submodule and the public
# function, and the import system sets the package attribute to the submodule when it is
# first loaded. Loading them here, then binding the functions, makes the functions win.
from fxrec.capture import capture, find_tables  # noqa: E402
from fxrec.shard import shard  # noqa: E402


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # cache: later lookups skip __getattr__
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"fxrec.{name}")
    if name in _ALIASES:
        return importlib.import_module(_ALIASES[name])
    raise AttributeError(f"module 'fxrec' has no attribute {name!r}")


def __dir__():
    return __all__

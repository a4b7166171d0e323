"""fxrec.passes: the compiler's graph passes, one file each, applied by `run_passes`.

`PASSES` is the ordered list of ``(name, fn)`` pairs, each ``fn(gm, ctx) -> GraphModule``;
the records the passes leave in ``node.meta`` / ``gm.meta`` are in `fxrec.passes.lookup`
and README.md states the invariants every pass keeps.
"""
from __future__ import annotations

from fxrec.passes.detect_embeddings import detect_embeddings_pass
from fxrec.passes.group_tables import group_tables_pass
from fxrec.passes.lookup import ArgRef, Lookup, LookupGroup, TableRead
from fxrec.passes.runner import PASSES, PassContext, PassError, lint, run_passes

__all__ = ["PASSES", "PassContext", "PassError", "run_passes", "lint", "detect_embeddings_pass",
           "group_tables_pass", "Lookup", "TableRead", "ArgRef", "LookupGroup"]

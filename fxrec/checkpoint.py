"""`fxrec.checkpoint`: save and load a ShardedModel (or a plain model), as the README shows.

The code lives in `fxrec.runtime.checkpoint` (DESIGN.md's layout keeps it in runtime/); this
module makes ``import fxrec.checkpoint`` and ``from fxrec.checkpoint import save, load`` work
too, and be that very module (one set of functions, one place to patch), not a copy.
"""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("fxrec.runtime.checkpoint")

"""`eager_under_dynamo`: fxrec's runtime modules run eagerly inside ``torch.compile``.

A user compiles what fxrec gave them (``torch.compile(sharded)``, ``torch.compile(served)``)
to speed up their dense layers. fxrec's lookups and collectives carry host-side sizes
(split sizes, bag bounds, per-table row counts) that dynamo would trace as symbols once a
new batch size makes it recompile with dynamic shapes; the graphs it then built around
their autograd Functions failed to compile. Marked here, each such module's forward is a
boundary: dynamo compiles the code between them and runs them as they are, as it runs the
collectives of `fxrec.runtime.comm`. (The fxrec compile backend builds its graphs after
dynamo has traced the user's model, so this changes nothing there.)
"""
from __future__ import annotations

import torch

__all__ = ["eager_under_dynamo"]


def eager_under_dynamo(cls):
    """Class decorator: the module's forward is never traced by dynamo."""
    cls.forward = torch.compiler.disable(cls.forward)
    return cls

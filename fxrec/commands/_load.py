"""Loading `FILE.py:FUNC` targets shared by `fxrec dump` and `fxrec plan`."""
from __future__ import annotations

import importlib.util
import os
import sys


class LoadError(Exception):
    """A target could not be loaded; the message is one line meant for the user."""


def load_target(spec: str):
    """Import FILE.py and call FUNC(); return its `(model, example_inputs)`.

    example_inputs is normalised to a tuple.
    """
    path, sep, func = spec.rpartition(":")
    if not sep or not path or not func:
        raise LoadError(f"expected FILE.py:FUNC, got {spec!r}")
    if not os.path.isfile(path):
        raise LoadError(f"no such file: {path!r}")
    name = "_fxrec_target_" + os.path.splitext(os.path.basename(path))[0]
    try:
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    except SystemExit as e:  # sys.exit() at import: the CLI would end with that status, silently
        raise LoadError(f"importing {path!r} called sys.exit({e.code!r})") from e
    except Exception as e:  # a user's file may raise anything while importing
        raise LoadError(f"importing {path!r} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, func, None)
    if not callable(fn):
        raise LoadError(f"{path!r} has no function {func!r}")
    try:
        result = fn()
    except SystemExit as e:
        raise LoadError(f"{path}:{func}() called sys.exit({e.code!r})") from e
    except Exception as e:
        raise LoadError(f"{path}:{func}() raised {type(e).__name__}: {e}") from e
    if not (isinstance(result, tuple) and len(result) == 2):
        raise LoadError(f"{path}:{func}() must return (model, example_inputs), got {type(result).__name__}")
    model, example_inputs = result
    import torch.nn as nn

    if not isinstance(model, nn.Module):
        raise LoadError(f"{path}:{func}() must return (model, example_inputs) with an nn.Module first, got "
                        f"{type(model).__name__}")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    return model, example_inputs

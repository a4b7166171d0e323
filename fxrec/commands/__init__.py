"""Sub-commands of the `fxrec` CLI, one module each (see fxrec/cli.py)."""

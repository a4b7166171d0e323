"""fxrec.runtime."""

"""Running a test file's Triton tests in a child pytest under TRITON_INTERPRET=1.

The interpreter must be switched on before triton is imported, so a test file reruns itself
in a child process with TRITON_INTERPRET=1 and FXREC_TEST_KERNELS=triton (the child selects
its Triton cases by that variable); nothing leaks into the parent process.
"""
from __future__ import annotations

import os
import subprocess
import sys


def run_interpreter_child(test_file: str, deselect: str) -> tuple[int, str, str]:
    """(exit status, stdout, the tails of stdout and stderr for a failure message) of
    ``pytest test_file -k 'not (deselect)'`` in a child under the Triton interpreter,
    FXREC_KERNEL unset."""
    env = {k: v for k, v in os.environ.items() if k != "FXREC_KERNEL"}
    env.update(TRITON_INTERPRET="1", FXREC_TEST_KERNELS="triton")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file,
                           "-k", f"not ({deselect})"], env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stdout[-6000:] + proc.stderr[-2000:]


def assert_interpreter_child_passes(test_file: str, deselect: str, allow_skips: bool = False) -> None:
    """A test file's whole interpreter suite: `run_interpreter_child` passes, runs tests, fails
    none and (unless `allow_skips`) skips none: a Triton case must not pass by not running."""
    import pytest
    pytest.importorskip("triton")
    status, out, tail = run_interpreter_child(test_file, deselect)
    assert status == 0, tail
    assert " passed" in out and "failed" not in out, tail
    assert allow_skips or "skipped" not in out, tail

"""Fixtures shared by several test files."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test: the CPU kernel choice depends on the thread
    count (fbgemm's pooled forward serves one thread, torch's embedding_bag several)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

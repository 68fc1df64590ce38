"""Fixtures for the trainer tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def torch_one_thread():
    """Tiny graphs: one torch thread (OpenMP barriers on a shared 2-core box cost more than they save)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

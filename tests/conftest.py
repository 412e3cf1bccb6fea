"""Shared fixtures. Add fixtures here; keep heavy ones (full SD1.5 size) module-scoped in their test file."""

import pytest
import torch

from reference import TINY, engine_models, reference_models
from tools.make_checkpoint import random_state_dict


@pytest.fixture(scope="session")
def tiny_state_dict():
    """Original-layout random checkpoint for the tiny configs (`reference.TINY`); treat as read-only."""
    return random_state_dict(seed=0)


@pytest.fixture(scope="session")
def tiny_models(tiny_state_dict):
    """(reference, ours) `reference.Models` for the tiny configs, sharing `tiny_state_dict`'s tensors."""
    return reference_models(tiny_state_dict, TINY), engine_models(tiny_state_dict, TINY)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread runs them many times faster than two on a small, shared CPU
    (no threads spinning against other processes). Use with pytest.mark.usefixtures; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Shared fixtures. Add fixtures here; keep heavy ones (full SD1.5 size) module-scoped in their test file."""

import pytest

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

"""Shared test configuration: a deterministic hypothesis profile and dtype tolerances."""

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("lowrank_op", derandomize=True, database=None, deadline=None, max_examples=25)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "lowrank_op"))

# Two threads, as on the CI machine; keeps timings of the suite predictable.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

import pytest
import torch


@pytest.fixture(autouse=True)
def seeded_torch():
    """Every kernel test draws its data from a fixed seed, so a failure reproduces."""
    torch.manual_seed(0)

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from flowmap.oracles import GaussianTarget  # noqa: E402


@pytest.fixture
def gaussian():
    torch.manual_seed(0)
    return GaussianTarget(
        torch.tensor([1.0, -2.0], dtype=torch.float64),
        torch.tensor([0.5, 1.5], dtype=torch.float64),
        "linear",
    )

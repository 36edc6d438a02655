"""Fixtures of the embedding tests; the catalogue they run on is in embed_catalogue.py."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray per test module (num_cpus=2), shut down after the module."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The models here are tiny: one thread avoids spin-waiting on a busy 2-core machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

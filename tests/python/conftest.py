"""Shared fixtures: the devices to run on, fresh random generators, and the `gpu` marker."""

from __future__ import annotations

import os

import numpy as np
import pytest

import cudablocks as cb


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if cb.cuda_device_count() > 0:
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest) -> cb.Device:
    """Each test taking `device` runs on the CPU and on cuda:0 (the latter marked `gpu`)."""
    return cb.Device(request.param)


@pytest.fixture
def rng() -> np.random.Generator:
    """A generator with a fresh seed each run, printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    return np.random.default_rng(seed)

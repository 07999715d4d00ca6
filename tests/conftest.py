"""Shared fixtures. Tests run on one thread so the suite is fast and timings are stable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the per-user data cache at an empty folder so no test reads or writes ~/.cache."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("CROSSDISTILL_CACHE", str(cache))
    return cache


@pytest.fixture
def fashion_dir() -> Path:
    """The Debian package's Fashion-MNIST files; tests using them are skipped where it is absent."""
    if not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not installed at {FASHION_DIR}")
    return FASHION_DIR


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)

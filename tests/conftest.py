"""Shared fixtures. Real data samples live in ../shared/data beside the checkout and may be absent."""
from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
CRITEO_SAMPLE = os.path.join(SHARED_DATA, "criteo_kaggle_head", "train_head.txt")

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def criteo_sample() -> str:
    """Path of the real 1,000-row Criteo sample; the test is skipped when ../shared is absent."""
    if not os.path.exists(CRITEO_SAMPLE):
        pytest.skip(f"real Criteo sample not present at {CRITEO_SAMPLE}")
    return CRITEO_SAMPLE

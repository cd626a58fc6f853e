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


# -- shared by the serving tests: one real export (TFT graph + ctrkit model) per test module --

@pytest.fixture(scope="module")
def exported():
    from ctrkit.serving import testing

    return testing.session_export()


@pytest.fixture(scope="module")
def loaded(exported):
    import tensorflow as tf

    return tf.saved_model.load(exported["path"])


@pytest.fixture(scope="module")
def serving_spec(exported):
    """The raw tf.Example parse spec the export serves (label excluded)."""
    import tensorflow_transform as tft

    from ctrkit.serving.signatures import read_raw_feature_spec, serving_parse_spec

    raw = read_raw_feature_spec(tft.TFTransformOutput(exported["pipeline"]))
    return serving_parse_spec(raw, exclude=[exported["manifest"].label])

"""TF Serving export and a local TF-Serving-compatible REST endpoint.

* :func:`export_model` / :func:`make_export_fn` (:mod:`ctrkit.serving.export`): SavedModel with the
  tensorflow-transform graph inside, TF Serving layout ``BASE/NAME/<version>/``, warmup requests.
* :mod:`ctrkit.serving.server`: ``ctrkit serve`` (needs ``pip install ctrkit[serve]``).
* ``serving/deploy/``: ``models.config``, ``batching.config`` and a README for running the real
  ``tensorflow/serving`` container on an export.

Imports are lazy: ``import ctrkit.serving`` does not load TensorFlow.
"""
from __future__ import annotations

from typing import Any

__all__ = ["export_model", "make_export_fn"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ctrkit.serving import export

        return getattr(export, name)
    raise AttributeError(f"module 'ctrkit.serving' has no attribute {name!r}")

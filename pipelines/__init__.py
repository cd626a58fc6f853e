"""``ctrkit.pipelines``: the Beam + tensorflow-transform preprocessing job.

Library entry point: :func:`preprocess` (what ``ctrkit preprocess`` runs). Building blocks for your own
Beam pipelines: :class:`ReadRawLogs`, :class:`ToWindowedTFTBatches`, :class:`WriteWindowShards`,
:func:`make_preprocessing_fn`, :func:`tensor_adapter_config`, :data:`PASSTHROUGH` (see :class:`WriteWindowShards` for
how they fit together), :func:`build_pipeline`. Heavy imports (Beam, TFT) happen on first use.
"""
from __future__ import annotations

from typing import Any

__all__ = [
    "PASSTHROUGH",
    "ReadRawLogs",
    "ToWindowedTFTBatches",
    "WriteWindowShards",
    "build_pipeline",
    "make_preprocessing_fn",
    "preprocess",
    "read_file",
    "tensor_adapter_config",
]

_WHERE = {
    "preprocess": "ctrkit.pipelines.runner",
    "ReadRawLogs": "ctrkit.pipelines.beam_pipeline",
    "ToWindowedTFTBatches": "ctrkit.pipelines.beam_pipeline",
    "WriteWindowShards": "ctrkit.pipelines.beam_pipeline",
    "build_pipeline": "ctrkit.pipelines.beam_pipeline",
    "make_preprocessing_fn": "ctrkit.pipelines.transform",
    "read_file": "ctrkit.pipelines.reading",
    "PASSTHROUGH": "ctrkit.pipelines.transform",
    "tensor_adapter_config": "ctrkit.pipelines.transform",
}


def __getattr__(name: str) -> Any:
    # Lazy: `import ctrkit.pipelines` must not pull in Beam/TFT (the CLI imports it for --help).
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'ctrkit.pipelines' has no attribute {name!r}")

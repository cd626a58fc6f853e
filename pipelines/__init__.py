"""``ctrkit.pipelines``: the Beam + tensorflow-transform preprocessing job.

Library entry point: :func:`preprocess` (what ``ctrkit preprocess`` runs). Building blocks for your own
Beam pipelines: :func:`file_tuples`, :class:`ReadRawLogs`, :class:`ToWindowedTFTBatches`,
:class:`KeepAnalysisWindows` (with :func:`analysis_windows`), :class:`WriteWindowShards`, :func:`make_preprocessing_fn`,
:func:`tensor_adapter_config`, :data:`PASSTHROUGH` (see :class:`WriteWindowShards` for how they fit together),
:func:`saved_with_tf1_tags` (to re-apply a saved transform), :func:`build_pipeline`. Heavy imports (Beam, TFT)
happen on first use.
"""
from __future__ import annotations

from typing import Any

__all__ = [
    "KeepAnalysisWindows",
    "PASSTHROUGH",
    "ReadRawLogs",
    "ToWindowedTFTBatches",
    "WriteWindowShards",
    "analysis_windows",
    "build_pipeline",
    "file_tuples",
    "make_preprocessing_fn",
    "preprocess",
    "read_file",
    "saved_with_tf1_tags",
    "tensor_adapter_config",
]

_WHERE = {
    "preprocess": "ctrkit.pipelines.runner",
    "KeepAnalysisWindows": "ctrkit.pipelines.beam_pipeline",
    "ReadRawLogs": "ctrkit.pipelines.beam_pipeline",
    "ToWindowedTFTBatches": "ctrkit.pipelines.beam_pipeline",
    "WriteWindowShards": "ctrkit.pipelines.beam_pipeline",
    "analysis_windows": "ctrkit.pipelines.runner",
    "build_pipeline": "ctrkit.pipelines.beam_pipeline",
    "file_tuples": "ctrkit.pipelines.runner",
    "saved_with_tf1_tags": "ctrkit.pipelines.runner",
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

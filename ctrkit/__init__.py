"""ctrkit: large-scale CTR modelling with learned feature crosses (DCN-V2).

Subpackages: ``ctrkit.layers`` (Keras 3 layers), ``ctrkit.pipelines`` (Beam + tensorflow-transform),
``ctrkit.serving`` (TF Serving export and a local REST endpoint). The core modules here hold the config,
the feature schema, model assembly, the online trainer and metrics.
"""
from ctrkit._version import __version__

__all__ = ["__version__"]

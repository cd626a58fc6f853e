"""ctrkit.layers: Keras 3 layers for DCN-V2 CTR models. Imports nothing else of ctrkit (no Beam, no TFT).

Cross layers: :class:`Cross` (weight-compatible with keras-rs ``FeatureCross`` and TFRS ``Cross``),
:class:`CrossMixture`, :class:`CrossNetwork`, :class:`DCN`. Inputs: :class:`FeatureEmbedding`.
Activation: :class:`SmeLU` / ``"smelu"``. Heads and losses: :class:`DistillationHead`,
:func:`distillation_loss`, :class:`DistillationLoss`. Calibration: :class:`TemperatureScaling`,
:class:`PiecewiseLinearCalibration`, :class:`BiasCalibration`.
"""
from ctrkit.layers.activations import SmeLU, smelu
from ctrkit.layers.calibration import BiasCalibration, PiecewiseLinearCalibration, TemperatureScaling
from ctrkit.layers.cross import Cross
from ctrkit.layers.cross_mixture import CrossMixture
from ctrkit.layers.cross_network import CrossNetwork
from ctrkit.layers.dcn import DCN
from ctrkit.layers.distillation import DistillationHead, DistillationLoss, distillation_loss, teacher_confidence
from ctrkit.layers.embedding import FeatureEmbedding

__all__ = [
    "BiasCalibration",
    "Cross",
    "CrossMixture",
    "CrossNetwork",
    "DCN",
    "DistillationHead",
    "DistillationLoss",
    "FeatureEmbedding",
    "PiecewiseLinearCalibration",
    "SmeLU",
    "TemperatureScaling",
    "distillation_loss",
    "smelu",
    "teacher_confidence",
]

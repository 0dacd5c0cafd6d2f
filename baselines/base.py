"""The Method protocol every detector follows, and the registry that finds methods by name.

Style follows scikit-learn: every configuration value is an explicit keyword argument of the
constructor, stored unchanged under the same attribute name (a method never rewrites them later),
so :meth:`Method.get_config` can read the configuration back from the signature and a saved run can
rebuild the method exactly. Learned state lives in tensors (:meth:`state_dict`), so a saved run holds
weights and JSON, never pickled code.

Each option is declared once, in the method's ``OPTIONS`` (an :class:`Option` per constructor
argument): its type, its allowed range or choices, and whether it acts at inference only. That one
declaration is checked whenever a method is constructed (so ``--set topk=1.5`` fails before any
work, at train time as at predict time) and when a saved run is loaded with overrides: only
inference options may differ from what the run was fitted with.

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
import math
import numbers
import typing
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Option:
    """One constructor argument of a method, declared once: the values it takes and when it may change.

    ``kind`` is ``bool``, ``int``, ``float``, ``str`` or ``object`` (anything; only for options a
    method did not declare). ``many``: a non-empty list of such values, ``unique`` ones if asked.
    ``low``/``high`` bound a number (each item of a list), ``open_low`` excludes ``low`` itself,
    ``multiple`` asks for a multiple of it. ``choices`` are the texts allowed; with ``sep`` a text is
    a ``sep``-joined selection of them (``recovery+segmentation``). ``null``: ``None`` is allowed too.
    Floats must be finite. ``predict``: the option acts at inference only, so a saved run may be
    loaded with another value (``3cad predict --set``); any other option shaped what ``fit`` learned.
    """

    kind: type
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    multiple: int | None = None
    choices: tuple[str, ...] = ()
    sep: str | None = None
    many: bool = False
    unique: bool = False
    null: bool = False
    predict: bool = False

    def allowed(self) -> str:
        """What the option takes, in words: ``a number in [0, 1]``, ``a whole number >= 1 or null``."""
        if self.many:
            text = f"a non-empty list of {'distinct ' if self.unique else ''}{self._values_text(plural=True)}"
        else:
            text = self._values_text(plural=False)
        return f"{text} or null" if self.null else text

    def _values_text(self, plural: bool) -> str:
        if self.kind is bool:
            return "true or false"
        if self.kind is object:
            return "values" if plural else "any value"
        if self.kind is str:
            if self.sep:
                return f"a {self.sep}-joined choice of {', '.join(self.choices)}"
            if self.choices:
                return f"one of {', '.join(self.choices)}"
            return "texts" if plural else "a text"
        text = ("whole numbers" if plural else "a whole number") if self.kind is int else (
            "numbers" if plural else "a number")
        each = ", each" if plural else ""
        if self.low is not None and self.high is not None:
            text += f"{each} in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}]"
        elif self.low is not None:
            text += f"{each} {'>' if self.open_low else '>='} {self.low:g}"
        elif self.high is not None:
            text += f"{each} <= {self.high:g}"
        return text + (f", a multiple of {self.multiple}" if self.multiple else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.null
        if not self.many:
            return self._accepts_one(value)
        if not isinstance(value, (list, tuple)) or not value or not all(self._accepts_one(v) for v in value):
            return False
        return not self.unique or len(set(value)) == len(value)

    def _accepts_one(self, value: Any) -> bool:
        if self.kind is object:
            return True
        if self.kind is bool or isinstance(value, bool):
            return self.kind is bool and isinstance(value, bool)
        if self.kind is str:
            if not isinstance(value, str):
                return False
            if self.sep:
                return all(part.strip() in self.choices for part in value.split(self.sep))
            return not self.choices or value in self.choices
        number = numbers.Integral if self.kind is int else numbers.Real
        if not isinstance(value, number) or not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        if self.high is not None and value > self.high:
            return False
        return not self.multiple or value % self.multiple == 0

    def check(self, method: str, key: str, value: Any) -> None:
        """A one-line :class:`ThreecadError` naming the option, the bad value and what is allowed."""
        if not self.accepts(value):
            raise ThreecadError(f"method {method!r} option {key} takes {self.allowed()}, got {value!r}")


def _inferred_option(default: Any, hint: Any) -> Option:
    """The declaration of an option a (third-party) method did not declare, from its default:
    a bool or a number must stay one (``bool("false")`` is True); anything else is unchecked. It
    may change at predict, as every option could before declarations existed."""
    null = type(None) in typing.get_args(hint)
    if isinstance(default, bool):
        return Option(bool, null=null, predict=True)
    if isinstance(default, (int, float)):
        return Option(float, null=null, predict=True)
    return Option(object, null=True, predict=True)


class Method(abc.ABC):
    """An anomaly detector: ``fit`` on normal images, ``predict`` scores and maps.

    Images are float32 tensors ``(B, 3, H, W)`` in [0, 1] (see :class:`threecad.data.AnomalyDataset`);
    each method applies its own normalisation. ``predict`` returns ``(image_scores, anomaly_maps)``
    as numpy float32 arrays of shapes ``(B,)`` and ``(B, H, W)``: maps at the input resolution,
    raw scores (higher = more anomalous), never squashed or normalised.
    """

    name: ClassVar[str] = ""
    #: One :class:`Option` per constructor argument (see :meth:`options`).
    OPTIONS: ClassVar[dict[str, Option]] = {}
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

    def __new__(cls, *args: Any, **kwargs: Any):
        """Check every argument against its declared :class:`Option` before ``__init__`` runs.

        Here rather than in :func:`build` so that a method constructed directly (``PatchCore(topk=2)``)
        is checked by the same declaration; constructors keep only checks that relate two options.
        """
        try:
            bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
        except TypeError:
            return super().__new__(cls)  # a wrong call: __init__ raises the usual TypeError
        bound.apply_defaults()
        options = cls.options()
        for key, value in bound.arguments.items():
            if key in options:
                options[key].check(cls.name, key, value)
        return super().__new__(cls)

    # ------------------------------------------------------------------ configuration
    @classmethod
    def options(cls) -> dict[str, Option]:
        """The declaration of every constructor argument: ``OPTIONS``, inferred from defaults where missing."""
        options = {key: cls.OPTIONS[key] for key in cls.config_keys() if key in cls.OPTIONS}
        missing = [key for key in cls.config_keys() if key not in options]
        if missing:
            params = inspect.signature(cls.__init__).parameters
            hints = typing.get_type_hints(cls.__init__)
            options.update({key: _inferred_option(params[key].default, hints.get(key)) for key in missing})
        return options

    @classmethod
    def config_keys(cls) -> list[str]:
        params = inspect.signature(cls.__init__).parameters
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [n for n, p in params.items() if n != "self" and p.kind in kinds]

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, read back from attributes of the same name (JSON-serialisable)."""
        return {key: getattr(self, key) for key in self.config_keys()}

    def resolved_config(self) -> dict[str, Any]:
        """Options whose value ``fit`` settled (CFRG: the teacher actually built, the input side it
        trained at), saved in place of the constructor's so a loaded run rebuilds what was trained.

        A method never rewrites its constructor attributes, so the options it was built with stay
        what the user asked for; this is where what was actually used is reported. Empty by default.
        """
        return {}

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write ``config.json`` and ``weights.pt`` (tensors only) into the folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in self.state_dict().items()}, buffer)
        write_bytes(path / WEIGHTS_FILE, buffer.getvalue())
        config = {**self.get_config(), **self.resolved_config()}
        write_json(path / CONFIG_FILE, {"method": self.name, "config": config, "threecad": __version__})
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
    """Construct a method by name, before any work: an unknown key is an error listing the valid
    ones, a value outside its :class:`Option` one naming the option, the value and what is allowed."""
    cls = get_method(name)
    unknown = sorted(set(config) - set(cls.config_keys()))
    if unknown:
        raise ThreecadError(
            f"method {name!r} has no option(s) {', '.join(unknown)}; valid: {', '.join(cls.config_keys())}"
        )
    return cls(**config)  # Method.__new__ checks every value against its declaration


def _plain(value: Any) -> Any:
    """Tuples as lists, so an override compares equal to the JSON value a run saved."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def check_overrides(cls: type[Method], saved: dict[str, Any], overrides: dict[str, Any],
                    source: str | Path | None = None) -> None:
    """Refuse an override of a fitted run's option that is not an inference option.

    ``coreset_ratio``, ``backbone`` or ``intensity_weight`` shaped the weights; predicting with another
    value would pair them with a configuration they were never fitted with. The same value as saved
    is accepted (it changes nothing).
    """
    options = cls.options()
    params = inspect.signature(cls.__init__).parameters
    for key, value in overrides.items():
        option = options.get(key)
        if option is None or option.predict:
            continue  # unknown keys are build()'s error; inference options may change
        before = saved[key] if key in saved else params[key].default
        if _plain(value) != _plain(before):
            changeable = ", ".join(k for k, o in options.items() if o.predict)
            raise ThreecadError(f"{key} is fixed when the method is fitted ({before!r}); retrain to change it "
                                f"(options predict may change: {changeable})", source)


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
    check_overrides(get_method(name), config, overrides, path)
    config.update(overrides)
    with located(path):  # an override out of its range: name the run
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

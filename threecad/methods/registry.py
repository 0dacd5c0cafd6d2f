"""Finding methods by name, building them with checked options, and loading saved runs.

Methods register with :func:`register` when their module is imported. The built-in ones are found
lazily, on the first lookup: every module of the ``baselines`` package (so a new file dropped there
is found without editing anything) and :data:`BUILTIN_MODULES`. ``threecad`` itself never imports
them at import time. A third-party package adds its own method through the ``threecad.methods``
entry-point group (a name pointing at its class or module), without touching this one.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import pkgutil
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch

from threecad.errors import ThreecadError, located
from threecad.methods.method import CONFIG_FILE, INPUT_OPTIONS, WEIGHTS_FILE, Method

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "threecad.methods"
#: Packages whose every module is imported on the first lookup, and single modules besides them.
BUILTIN_PACKAGES = ("baselines",)
BUILTIN_MODULES = ("cfrg.method",)

_REGISTRY: dict[str, type[Method]] = {}
#: Built-in modules that failed to import (module -> reason), named when a method is not found.
_BROKEN: dict[str, str] = {}
_scanned = False


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method buildable by its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} must set a non-empty class attribute `name`")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise TypeError(f"method name {cls.name!r} is already registered by {existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _import(module: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - one broken module must not hide the other methods
        _BROKEN[module] = f"{exc.__class__.__name__}: {exc}"
        log.warning("method module %s cannot be imported (%s)", module, _BROKEN[module])


def _builtin_modules() -> list[str]:
    modules = []
    for package in BUILTIN_PACKAGES:  # shipped with threecad (pyproject's packages): always importable
        root = importlib.import_module(package)
        modules += [f"{package}.{info.name}" for info in pkgutil.iter_modules(root.__path__)]
    return modules + list(BUILTIN_MODULES)


def load_builtins() -> None:
    """Import the built-in method modules once (see the module docstring)."""
    global _scanned
    if _scanned:
        return
    _scanned = True
    for module in _builtin_modules():
        if importlib.util.find_spec(module.rpartition(".")[0] or module) is not None:
            _import(module)


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Names of all methods: built-in, registered, or installed through entry points."""
    load_builtins()
    return sorted(set(_REGISTRY) | set(_entry_points()))


def get_method(name: str) -> type[Method]:
    if name not in _REGISTRY:
        load_builtins()
    if name not in _REGISTRY:
        ep = _entry_points().get(name)
        if ep is None:
            broken = f" (not importable: {'; '.join(f'{m}: {r}' for m, r in _BROKEN.items())})" if _BROKEN else ""
            raise ThreecadError(f"unknown method {name!r}; available: {', '.join(available()) or 'none'}{broken}")
        loaded = ep.load()
        if name not in _REGISTRY:  # an entry point may name the class or just the module
            if isinstance(loaded, type) and issubclass(loaded, Method):
                register(loaded)
            else:
                raise ThreecadError(f"entry point {name!r} did not register a method (check {ep.value})")
    return _REGISTRY[name]


def build(name: str, **config: Any) -> Method:
    """Construct a method by name, before any work: an unknown key is an error listing the valid
    ones, a value outside its :class:`~threecad.methods.Option` one naming the option, the value
    and what is allowed."""
    cls = get_method(name)
    unknown = sorted(set(config) - set(cls.config_keys()))
    if unknown:
        raise ThreecadError(
            f"method {name!r} has no option(s) {', '.join(unknown)}; valid: {', '.join(cls.config_keys())}"
        )
    return cls(**config)  # the constructor checks every value against its declaration


def _plain(value: Any) -> Any:
    """Tuples as lists, so an override compares equal to the JSON value a run saved."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def check_overrides(cls: type[Method], saved: dict[str, Any], overrides: dict[str, Any],
                    source: str | Path | None = None) -> None:
    """Refuse an override of a fitted run's option that is not an inference option.

    ``coreset_ratio``, ``backbone``, ``size`` or ``exposure`` shaped the weights; predicting with
    another value would pair them with a configuration they were never fitted with. The same value
    as saved is accepted (it changes nothing).
    """
    options = cls.options()
    defaults = cls.defaults()
    for key, value in overrides.items():
        option = options.get(key)
        if option is None or option.predict:
            continue  # unknown keys are build()'s error; inference options may change
        before = saved[key] if key in saved else defaults[key]
        if _plain(value) != _plain(before):
            changeable = ", ".join(k for k, o in options.items() if o.predict)
            raise ThreecadError(f"{key} is fixed when the method is fitted ({before!r}); retrain to change it "
                                f"(options predict may change: {changeable})", source)


def load_method(path: str | Path, **overrides: Any) -> Method:
    """Rebuild a method from a folder written by :meth:`Method.save`.

    The saved configuration must name every option it was fitted with, the input options
    included: a missing one would silently take today's default, which may not be what the weights
    were fitted with, so it is an error, as is an option the method no longer has.
    """
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ThreecadError(f"not a saved run: {CONFIG_FILE} is missing", path)
    try:
        saved = json.loads(config_path.read_text())
        name, config = saved["method"], dict(saved["config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ThreecadError(f"corrupt {CONFIG_FILE} ({exc})", config_path) from None
    cls = get_method(name)
    missing = [key for key in INPUT_OPTIONS if key not in config]
    if missing:
        raise ThreecadError(f"{CONFIG_FILE} does not record {', '.join(missing)} (saved by an older threecad): "
                            "train the run again", config_path)
    check_overrides(cls, config, overrides, path)
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

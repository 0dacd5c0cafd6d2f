"""The Method protocol every detector follows, its option declarations and its saved form.

Style follows scikit-learn: every configuration value is an explicit keyword argument of the
constructor, stored unchanged under the same attribute name (a method never rewrites them later),
so :meth:`Method.get_config` can read the configuration back from the signature and a saved run can
rebuild the method exactly. Learned state lives in tensors (:meth:`Method.state_dict`), so a saved
run holds weights and JSON, never pickled code.

Each option is declared once, in the method's ``OPTIONS`` (an :class:`Option` per constructor
argument): its type, its allowed range or choices, and whether it acts at inference only. That one
declaration is checked whenever a method is constructed (so ``--set topk=1.5`` fails before any
work, at train time as at predict time) and when a saved run is loaded with overrides: only
inference options may differ from what the run was fitted with.

Every method also takes the three **input options** of :data:`INPUT_OPTIONS` (``size``, ``resize``,
``exposure``), declared here once for all: how an image at its native size becomes the model's
input, exactly as :class:`threecad.dataset.loaders.AnomalyDataset` loads it. They are saved with the method, so
``load_method(run).predict(images)`` takes images at any size and returns maps at each image's own
size. A subclass implements :meth:`Method.predict_batch` on a batch already at its input size.
"""

from __future__ import annotations

import abc
import inspect
import io
import math
import numbers
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from threecad import __version__
from threecad.dataset.transforms import EXPOSURE_MODES, ResizeMode
from threecad.errors import ThreecadError
from threecad.io import write_bytes, write_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
#: The runner's record of a run (dataset, category, input settings, timings), beside config.json.
RUN_FILE = "run.json"


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


#: How a native image becomes the model's input, for every method (see :mod:`threecad.dataset`):
#: ``size`` the side it is resized to (``None``: fed as it is), ``resize`` squash / aspect / native,
#: ``exposure`` raw / mean. They shape what ``fit`` learns, so a saved run keeps them.
INPUT_OPTIONS: dict[str, Option] = {
    "size": Option(int, low=1, null=True),
    "resize": Option(str, choices=typing.get_args(ResizeMode)),
    "exposure": Option(str, choices=EXPOSURE_MODES),
}
#: Their values when a method is constructed without them, unless the method recommends others
#: (:attr:`Method.DEFAULT_INPUTS`); the runner always sets them (``size`` 256 there).
INPUT_DEFAULTS: dict[str, Any] = {"size": None, "resize": "squash", "exposure": "raw"}


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


class _MethodType(abc.ABCMeta):
    """Constructs a method: checks every argument against its declaration before ``__init__`` runs,
    and takes the input options a subclass's constructor does not name itself (they are set as
    attributes before ``__init__``, so a subclass may read ``self.size``)."""

    def __call__(cls, *args: Any, **kwargs: Any):
        own = cls._constructor_keys()
        inputs = {key: kwargs.pop(key) for key in list(kwargs) if key in INPUT_OPTIONS and key not in own}
        cls._check_arguments(args, kwargs, inputs)
        method = cls.__new__(cls)
        defaults = cls.input_defaults()
        for key in INPUT_OPTIONS:
            if key not in own:
                setattr(method, key, inputs.get(key, defaults[key]))
        method.__init__(*args, **kwargs)
        return method


class NetInference(torch.nn.Module):
    """A method's inference module made of its network and the maths after it:
    ``forward(images) = run(net, images)``, ``run`` returning ``(scores (B,), maps (B, H, W))`` tensors.

    ``net`` is registered as a submodule (its weights are the graph's); ``run`` is the method's own
    function (e.g. a bound method reading ``sigma`` and ``topk``), the one both engines execute.
    """

    def __init__(self, net: torch.nn.Module, run: Callable[[torch.nn.Module, torch.Tensor],
                                                            tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.net = net
        self.run = run

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, maps = self.run(self.net, images)
        return scores.float(), maps.float()


class Method(abc.ABC, metaclass=_MethodType):
    """An anomaly detector: ``fit`` on normal images, ``predict`` scores and maps.

    :meth:`predict` takes images at any size (numpy ``HxW`` / ``HxWx3`` uint8 or uint16 arrays,
    float tensors ``3xHxW`` in [0, 1], or a batch tensor ``Bx3xHxW``), applies the saved input
    options and returns ``(image_scores, anomaly_maps)`` with each map at its image's native size.
    Subclasses implement :meth:`predict_batch` on float32 tensors ``(B, 3, H, W)`` in [0, 1] already
    at the input size (each method applies its own normalisation); it returns numpy float32 arrays
    of shapes ``(B,)`` and ``(B, H, W)``: raw scores (higher = more anomalous), never squashed.
    """

    name: ClassVar[str] = ""
    #: One :class:`Option` per constructor argument (see :meth:`options`).
    OPTIONS: ClassVar[dict[str, Option]] = {}
    #: Input options this method recommends over :data:`INPUT_DEFAULTS` (e.g. ``{"exposure": "mean"}``):
    #: what validation chose, so that a user who passes nothing gets the recommended transform.
    DEFAULT_INPUTS: ClassVar[dict[str, Any]] = {}
    #: ``3cad tune``'s grid: option name -> candidate values, the default first
    #: (:mod:`threecad.methods.tuning`). Small: every fit-time combination is one fit.
    TUNE_GRID: ClassVar[dict[str, tuple]] = {}
    #: Folder for a method's own training artefacts (checkpoints, logs); set by the runner before
    #: ``fit``. Not configuration: a method must work with ``None`` (then nothing is written).
    work_dir: Path | None = None
    #: The input options (:data:`INPUT_OPTIONS`), set at construction; a subclass may take one of
    #: them as its own constructor argument (CFRG's ``size``), which then declares it.
    size: int | None
    resize: str
    exposure: str

    @abc.abstractmethod
    def fit(self, train_set: torch.utils.data.Dataset, val_set: torch.utils.data.Dataset | None = None):
        """Learn from normal images, items of :class:`threecad.dataset.loaders.AnomalyDataset` already at the
        input settings (:meth:`input_settings`); returns ``self``. Never reads a test split."""

    @abc.abstractmethod
    def predict_batch(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (B,) and anomaly maps (B, H, W) for a batch (B, 3, H, W) at the input size."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything learned by ``fit``, as tensors (CPU copies are fine)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""

    # ------------------------------------------------------------------ configuration
    @classmethod
    def _constructor_keys(cls) -> list[str]:
        params = inspect.signature(cls.__init__).parameters
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [n for n, p in params.items() if n != "self" and p.kind in kinds]

    @classmethod
    def config_keys(cls) -> list[str]:
        """The constructor's arguments, then the input options it does not name itself."""
        own = cls._constructor_keys()
        return own + [key for key in INPUT_OPTIONS if key not in own]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The value of every option when it is not given."""
        params = inspect.signature(cls.__init__).parameters
        inputs = cls.input_defaults()
        return {key: params[key].default if key in params else inputs[key] for key in cls.config_keys()}

    @classmethod
    def input_defaults(cls) -> dict[str, Any]:
        """``size``, ``resize`` and ``exposure`` when not given: :data:`INPUT_DEFAULTS` with this
        method's :attr:`DEFAULT_INPUTS` over them."""
        return {**INPUT_DEFAULTS, **cls.DEFAULT_INPUTS}

    @classmethod
    def options(cls) -> dict[str, Option]:
        """The declaration of every option: ``OPTIONS``, :data:`INPUT_OPTIONS`, inferred from defaults where missing."""
        declared = {**INPUT_OPTIONS, **cls.OPTIONS}
        options = {key: declared[key] for key in cls.config_keys() if key in declared}
        missing = [key for key in cls.config_keys() if key not in options]
        if missing:
            params = inspect.signature(cls.__init__).parameters
            hints = typing.get_type_hints(cls.__init__)
            options.update({key: _inferred_option(params[key].default, hints.get(key)) for key in missing})
        return options

    @classmethod
    def _check_arguments(cls, args: tuple, kwargs: dict[str, Any], inputs: dict[str, Any]) -> None:
        """Every argument against its declared :class:`Option`; constructors keep only checks that
        relate two options. Here so that a method constructed directly (``PatchCore(topk=2)``) is
        checked by the same declaration as one from :func:`~threecad.methods.build`."""
        try:
            bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
        except TypeError:
            return  # a wrong call: __init__ raises the usual TypeError
        bound.apply_defaults()
        options = cls.options()
        for key, value in {**bound.arguments, **inputs}.items():
            if key in options:
                options[key].check(cls.name, key, value)

    def get_config(self) -> dict[str, Any]:
        """The options, read back from attributes of the same name (JSON-serialisable)."""
        return {key: getattr(self, key) for key in self.config_keys()}

    def resolved_config(self) -> dict[str, Any]:
        """Options whose value ``fit`` settled (CFRG: the teacher actually built, the input side it
        trained at), saved in place of the constructor's so a loaded run rebuilds what was trained.

        A method never rewrites its constructor attributes, so the options it was built with stay
        what the user asked for; this is where what was actually used is reported. Empty by default.
        """
        return {}

    # ------------------------------------------------------------------ inputs
    def input_settings(self) -> dict[str, Any]:
        """``size``, ``resize`` and ``exposure`` as this method feeds images to its model."""
        return {key: getattr(self, key) for key in INPUT_OPTIONS}

    def predict(self, images: Sequence[Any] | torch.Tensor,
                batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray | list[np.ndarray]]:
        """Scores and maps of images at any size, each map at its image's native size.

        ``images``: a list of numpy ``HxW`` / ``HxWx3`` uint8 or uint16 arrays (16 bits scaled as
        :func:`threecad.io.read_image` scales them) or float ``3xHxW`` tensors in [0, 1], or one
        ``Bx3xHxW`` tensor. Each is resized and exposure-normalised as
        :class:`threecad.dataset.loaders.AnomalyDataset` loads a file at this method's input settings,
        consecutive ones of equal input shape go to :meth:`predict_batch` together (``batch_size``,
        default the method's own or 16), and each map is resized back (bilinear) to its image's size.
        Returns the scores ``(N,)`` and, for a batch tensor, the maps ``(B, H, W)``; for a list, a
        list of ``(H_i, W_i)`` maps.
        """
        step = batch_size or getattr(self, "batch_size", 16)
        return predict_images(images, self.input_settings(), self.predict_batch, step, self.name)

    # ------------------------------------------------------------------ tensor forward
    def inference_module(self) -> torch.nn.Module:
        """The fitted inference as one ``torch.nn.Module``: images ``(B, 3, H, W)`` float in [0, 1] at
        the input size -> ``(scores (B,), maps (B, H, W))`` float32 tensors, on the method's device.

        A method whose inference is a tensor graph returns it here and its :meth:`predict_batch`
        runs this same module (:meth:`run_inference`), so ``3cad export`` (:mod:`threecad.export`)
        traces exactly what ``predict`` computes: there is no second copy of the inference maths.
        The base class has none: :meth:`exportable` is then False.
        """
        raise ThreecadError(f"method {self.name!r} has no tensor inference module, so it cannot be exported")

    def net_inference(self) -> torch.nn.Module:
        """The :meth:`inference_module` of a method whose fitted network is ``self.net`` and whose
        tensor maths is ``self._infer(net, images)`` (:class:`NetInference`); a one-line error
        before ``fit``."""
        net = getattr(self, "net", None)
        if net is None:
            raise ThreecadError(f"method {self.name!r} is not fitted: call fit() or load a saved run")
        return NetInference(net.eval(), self._infer)

    @classmethod
    def exportable(cls) -> bool:
        """Whether :meth:`inference_module` is implemented (the method's predict is one tensor graph)."""
        return cls.inference_module is not Method.inference_module

    def run_inference(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`predict_batch` of a method with an :meth:`inference_module`: that module on ``images``,
        as numpy float32 ``(B,)`` and ``(B, H, W)``."""
        module = self.inference_module()
        with torch.inference_mode():
            scores, maps = module(images.float())
        return scores.float().cpu().numpy(), maps.float().cpu().numpy()

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
        from threecad.methods.registry import load_method

        return load_method(path, **overrides)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{self.__class__.__name__}({args})"


def predict_images(images: Sequence[Any] | torch.Tensor, settings: dict[str, Any],
                   predict_batch: Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]],
                   batch_size: int | None, name: str) -> tuple[np.ndarray, np.ndarray | list[np.ndarray]]:
    """:meth:`Method.predict` for any engine: ``settings`` (``size``, ``resize``, ``exposure``) applied
    to each native image (:func:`threecad.methods.inputs.model_input`), consecutive equal input shapes
    batched (``batch_size``, default 16) into ``predict_batch``, maps resized back to native size.

    One road for a saved method and for its ONNX export (:class:`threecad.export.onnx.OnnxPredictor`),
    so both engines see the same tensors and return maps the same way.
    """
    from threecad.methods.inputs import model_input, native_size_maps

    stacked = isinstance(images, torch.Tensor)
    if stacked and images.ndim != 4:
        raise ThreecadError(f"predict takes a list of images or a (B, 3, H, W) tensor, got a tensor of shape "
                            f"{tuple(images.shape)}")
    items = list(images)
    prepared = [model_input(image, **settings) for image in items]
    native = [(int(image.shape[-1]), int(image.shape[-2])) if isinstance(image, torch.Tensor)
              else (int(image.shape[1]), int(image.shape[0])) for image in items]
    step = max(1, int(batch_size or 16))
    scores: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    start = 0
    while start < len(prepared):
        end = start + 1
        while end < len(prepared) and end - start < step and prepared[end].shape == prepared[start].shape:
            end += 1
        batch = torch.stack(prepared[start:end])
        with torch.no_grad():
            batch_scores, batch_maps = predict_batch(batch)
        batch_scores, batch_maps = np.asarray(batch_scores), np.asarray(batch_maps)
        if batch_scores.shape != (len(batch),) or batch_maps.shape != (len(batch), *batch.shape[-2:]):
            raise ThreecadError(f"method {name!r} returned scores {batch_scores.shape} and maps "
                                f"{batch_maps.shape} for a batch {tuple(batch.shape)}; predict_batch must "
                                "return (B,) and (B, H, W)")
        scores.append(batch_scores.astype(np.float32, copy=False))
        maps += native_size_maps(batch_maps, native[start:end])
        start = end
    all_scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    if stacked:
        return all_scores, (np.stack(maps) if maps else np.zeros((0, 0, 0), np.float32))
    return all_scores, maps

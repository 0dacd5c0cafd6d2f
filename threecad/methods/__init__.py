"""The method framework: the ``Method`` protocol, option declarations, the registry and runners.

- :mod:`threecad.methods.method`: :class:`Method`, :class:`Option`, the input options, saving;
- :mod:`threecad.methods.inputs`: the input transform (native image -> model input, maps back);
- :mod:`threecad.methods.registry`: :func:`register`, :func:`build`, :func:`load_method`;
- :mod:`threecad.methods.batching`: equal-shape batches of a dataset;
- :mod:`threecad.methods.runner`: ``3cad train`` / ``3cad predict`` (imported on use);
- :mod:`threecad.methods.training`: the one training engine of gradient-trained methods.

Built-in methods (``baselines``, ``cfrg``) are imported on the first lookup, never here.
"""

from threecad.methods.batching import iter_batches
from threecad.methods.inputs import model_input, native_size_maps
from threecad.methods.method import CONFIG_FILE, INPUT_OPTIONS, RUN_FILE, WEIGHTS_FILE, Method, Option
from threecad.methods.registry import available, build, check_overrides, get_method, load_method, register

__all__ = ["CONFIG_FILE", "INPUT_OPTIONS", "RUN_FILE", "WEIGHTS_FILE", "Method", "Option", "available", "build",
           "check_overrides", "get_method", "iter_batches", "load_method", "model_input", "native_size_maps",
           "register"]

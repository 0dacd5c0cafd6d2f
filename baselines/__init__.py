"""Reference anomaly-detection methods behind one interface (:class:`baselines.base.Method`)."""

from baselines.base import Method, available, build, get_method, load_method, register

__all__ = ["Method", "available", "build", "get_method", "load_method", "register"]

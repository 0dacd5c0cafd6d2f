"""threecad: data toolkit and shared building blocks for 3CAD-shaped anomaly detection.

The sub-packages ``baselines``, ``cfrg`` and ``leaderboard`` build on this one; nothing here
imports them (see ``docs/design.md``).
"""

from threecad.errors import ThreecadError

__version__ = "0.1.0"
__all__ = ["ThreecadError", "__version__"]

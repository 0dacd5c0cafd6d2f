"""CFRG (3CAD, AAAI 2025): heterogeneous distillation, recovery guidance and segmentation.

``cfrg.model`` (the network), ``cfrg.losses``, ``cfrg.train`` (resumable, DDP-ready loop),
``cfrg.infer`` (anomaly maps) and ``cfrg.method.CFRG`` (the registered ``Method``). See docs/cfrg.md.
"""

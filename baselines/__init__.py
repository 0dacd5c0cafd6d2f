"""Reference anomaly-detection methods (PatchCore, PaDiM, ...), each a :class:`threecad.methods.Method`.

Every module here is imported on the first method lookup (:mod:`threecad.methods.registry`), so a
new method file registers itself without any other edit.
"""

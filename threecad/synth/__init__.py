"""Synthetic data: machined-metal surfaces with painted defects.

``surface`` renders clean textures and paints defect polygons; ``dataset`` writes an already
processed 3CAD-layout tree for fast tests of the later stages; ``raw`` writes a raw line-scan-like
set with LabelMe annotations (and deliberate breakage) for the preprocessing pipeline;
``validation`` turns a dataset's ``validation/good`` images into a labelled validation set with
synthetic anomalies (what ``3cad tune`` chooses settings on).
"""

"""Exports of trained runs to other inference engines (``3cad export``); see ``docs/export.md``.

:mod:`threecad.export.onnx` writes a run's inference as an ONNX model and scores images with
onnxruntime. Its third-party packages (``pip install 'threecad[onnx]'``) are imported on use only.
"""

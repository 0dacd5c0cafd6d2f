"""Factory inspection: score whole frames with a trained run (``3cad inspect``) and set its
thresholds from held-out normal images (``3cad calibrate``). See ``docs/inspection.md``."""

from threecad.inspect.calibration import CALIBRATION_FILE, calibrate, read_calibration, threshold_for_rate
from threecad.inspect.inspection import COLUMNS, format_summary, inspect
from threecad.inspect.predictor import default_threads, load_predictor
from threecad.inspect.stitching import frame_windows, score_frame, stitch

__all__ = ["CALIBRATION_FILE", "COLUMNS", "calibrate", "default_threads", "format_summary", "frame_windows",
           "inspect", "load_predictor", "read_calibration", "score_frame", "stitch", "threshold_for_rate"]

"""Anomaly maps: the submission layout on disk (``files``) and shared post-processing (``postprocess``)."""

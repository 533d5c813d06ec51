"""Errors the AI side raises on purpose; the worker records the message as the job's failure
reason."""


class ModelError(Exception):
    """A model folder is unusable: missing or invalid ``model.toml``, missing weights."""


class DecoderUnavailable(Exception):
    """The input's transfer syntax needs a decoder plug-in (pylibjpeg-*, GDCM) that this worker
    lacks: the input is fine, the installation is not."""


class AnalysisError(Exception):
    """The input cannot be analysed: corrupt or undecodable pixel data, or geometry the model
    cannot use (e.g. slices of different sizes, a WSI that is not TILED_FULL)."""

"""The pipeline: the request type, its infotext, the stages of a generation, and `Pipeline` itself."""

from .images import ImageError, Pixels
from .loading import load
from .pipeline import Pipeline
from .request import (DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, FromInfotext, ModelInfo, Request,
                      random_seed)

__all__ = ["load", "Pipeline", "Request", "FromInfotext", "ModelInfo", "ImageError", "Pixels", "random_seed",
           "DEFAULT_SAMPLER", "DEFAULT_STEPS", "DEFAULT_GUIDANCE"]

"""Adaptive Inference Runtime: early exit, dynamic depth and speculative decoding over HF causal LMs."""

from .config import EarlyExitConfig, ModelSpec, SamplingConfig
from .errors import (AdaptiveError, CheckpointError, ContextLengthError, InvalidRequestError, TraceFormatError,
                     UnsupportedModelError)
from .runtime import GenerationStream, Runtime
from .trace import GenerationResult, TokenTrace

__all__ = ["Runtime", "GenerationResult", "GenerationStream", "TokenTrace", "EarlyExitConfig", "ModelSpec",
           "SamplingConfig", "AdaptiveError", "CheckpointError", "ContextLengthError", "InvalidRequestError",
           "TraceFormatError", "UnsupportedModelError"]

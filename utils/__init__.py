"""Concurrency core: one shared diffusers pipeline, many request-scoped views.

Nothing here imports FastAPI or holds module-level state.
"""

from .requestscopedpipeline import RequestScopedPipeline
from .scheduler import BaseAsyncScheduler, async_retrieve_timesteps
from .wrappers import ThreadSafeImageProcessorWrapper, ThreadSafeTokenizerWrapper, ThreadSafeVAEWrapper

__all__ = [
    "BaseAsyncScheduler",
    "RequestScopedPipeline",
    "ThreadSafeImageProcessorWrapper",
    "ThreadSafeTokenizerWrapper",
    "ThreadSafeVAEWrapper",
    "async_retrieve_timesteps",
]

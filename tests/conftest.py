"""Shared fixtures. Nothing here reaches a model hub: the pipelines are random-weight ones built locally."""

from __future__ import annotations

import os

# Set before diffusers/transformers are imported anywhere: a test must never try the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipeline():
    """The `random:tiny` pipeline, built once per test run. Tests must not mutate it."""
    from Pipelines import TextToImagePipelineSD3

    return TextToImagePipelineSD3("random:tiny", device="cpu").start().pipeline

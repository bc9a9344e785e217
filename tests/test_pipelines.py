"""Model loading: any SD3 directory, device/dtype resolution, clear errors with hints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from Pipelines import (
    ModelLoadError,
    ModelPipelineInitializer,
    PresetModels,
    TextToImagePipelineSD3,
    resolve_device,
    resolve_dtype,
)
from utils import RequestScopedPipeline


def _image(pipe, seed: int = 3) -> np.ndarray:
    out = pipe("a red bicycle", num_inference_steps=2, generator=torch.Generator().manual_seed(seed), output_type="np")
    return out.images


def test_presets_name_the_sd3_family() -> None:
    presets = PresetModels()
    assert presets.SD3_5_MEDIUM == "stabilityai/stable-diffusion-3.5-medium"
    assert presets.SD3_5_LARGE.endswith("stable-diffusion-3.5-large")
    assert presets.SD3_5_LARGE_TURBO.endswith("large-turbo")
    assert "stable-diffusion-3-medium" in presets.SD3
    assert presets.RANDOM_TINY == "random:tiny"


def test_saved_directory_loads_through_the_initializer_and_generates(tiny_pipeline, tmp_path) -> None:
    tiny_pipeline.save_pretrained(tmp_path / "my-sd3")
    loader = ModelPipelineInitializer(str(tmp_path / "my-sd3"), type_models="t2im", device="cpu").initialize_pipeline()
    assert loader.start() is loader
    assert loader.device == torch.device("cpu")
    assert loader.dtype == torch.float32
    assert loader.pipeline.transformer.dtype == torch.float32
    # The loaded copy generates, through a request-scoped view, what the original does (up to the last bit:
    # freshly loaded tensors can take other SIMD paths than the originals).
    loaded = RequestScopedPipeline(loader.pipeline).generate
    np.testing.assert_allclose(_image(loaded), _image(RequestScopedPipeline(tiny_pipeline).generate), atol=1e-5)


def test_random_preset_loads_with_dtype_override() -> None:
    loader = TextToImagePipelineSD3("random:tiny", device="cpu", dtype="bfloat16").start()
    assert loader.pipeline.transformer.dtype == torch.bfloat16
    assert _image(loader.pipeline).shape == (1, 64, 64, 3)


def test_device_and_dtype_resolution() -> None:
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    with pytest.raises(ModelLoadError, match="unknown dtype") as err:
        resolve_dtype("float8", torch.device("cpu"))
    assert "bfloat16" in err.value.hint
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device("cuda")


def test_unsupported_type_models_is_explained() -> None:
    with pytest.raises(ModelLoadError, match="unsupported type_models 'img2vid'") as err:
        ModelPipelineInitializer("random:tiny", type_models="img2vid").initialize_pipeline()
    assert "t2im" in err.value.hint


@pytest.mark.parametrize(
    ("model", "message", "hint"),
    [
        ("/nonexistent/sd3-dir", "does not exist", "check the path"),
        ("random:huge", "valid presets", "random:tiny"),
        # HF_HUB_OFFLINE=1 (conftest): an uncached hub id fails at once, with the offline hint.
        ("stabilityai/stable-diffusion-3.5-medium", "cannot load model", "random:tiny"),
    ],
)
def test_unloadable_models_are_explained(model: str, message: str, hint: str) -> None:
    with pytest.raises(ModelLoadError, match=message) as err:
        TextToImagePipelineSD3(model, device="cpu").start()
    assert hint in err.value.hint
    assert "Hint:" in str(err.value)


def test_directory_of_another_pipeline_is_refused(tmp_path) -> None:
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion 3 pipeline"):
        TextToImagePipelineSD3(str(tmp_path), device="cpu").start()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        TextToImagePipelineSD3(str(empty), device="cpu").start()

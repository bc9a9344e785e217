"""Tests for the offline random-weight SD3 presets in models (built by models.random_build)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

# A random preset must never need the network; make any attempt fail loudly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image

from models.random_build import (
    RANDOM_PRESETS,
    build_random_pipeline,
    is_random_preset,
)

PROMPT = "a photo of an astronaut riding a horse"
MODULES = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    # The tiny model's ops take microseconds; with 2 intra-op threads on a busy
    # 2-core machine, OpenMP barriers stall each op for milliseconds (20 steps go
    # from 0.3 s to 10 s), so run these tests single-threaded.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny(tiny_pipeline) -> StableDiffusion3Pipeline:
    return tiny_pipeline


def _generate(
    pipe: StableDiffusion3Pipeline,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
) -> Image.Image:
    result = pipe(
        PROMPT,
        num_inference_steps=2,
        height=height,
        width=width,
        generator=torch.Generator().manual_seed(seed),
        output_type="pil",
    )
    return result.images[0]


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_preset_names() -> None:
    assert RANDOM_PRESETS == ("random:tiny", "random:small", "random:sd3.5-medium")
    assert all(is_random_preset(name) for name in RANDOM_PRESETS)
    assert is_random_preset("random:whatever")
    assert not is_random_preset("stabilityai/stable-diffusion-3.5-medium")


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="random:nope") as excinfo:
        build_random_pipeline("random:nope")
    for name in RANDOM_PRESETS:
        assert name in str(excinfo.value)


def test_tiny_is_small_and_cheap(tiny: StableDiffusion3Pipeline) -> None:
    total = sum(_n_params(getattr(tiny, name)) for name in MODULES)
    assert total < 2_000_000
    assert tiny.vae_scale_factor == 8
    assert tiny.default_sample_size * tiny.vae_scale_factor == 64
    for name in MODULES:
        module = getattr(tiny, name)
        assert not module.training  # dropout off, or T5 output would be random


def test_tiny_default_size_is_64(tiny: StableDiffusion3Pipeline) -> None:
    image = _generate(tiny)
    assert isinstance(image, Image.Image)
    assert image.size == (64, 64)
    assert np.isfinite(np.asarray(image, dtype=np.float32)).all()


@pytest.mark.parametrize(("height", "width"), [(64, 64), (128, 128), (96, 256)])
def test_tiny_sizes(tiny: StableDiffusion3Pipeline, height: int, width: int) -> None:
    assert _generate(tiny, height, width).size == (width, height)


def test_tokenizers_fit_the_encoders(tiny: StableDiffusion3Pipeline) -> None:
    for tok, enc in (
        (tiny.tokenizer, tiny.text_encoder),
        (tiny.tokenizer_2, tiny.text_encoder_2),
    ):
        assert tok.model_max_length == 77
        # CLIP pools the hidden state at the first eos id; it must be the tokenizer's.
        assert enc.config.eos_token_id == tok.eos_token_id
        assert len(tok) <= enc.config.vocab_size
        ids = tok(PROMPT + " ünïcødé 🐱", padding="max_length", max_length=77).input_ids
        assert len(ids) == 77
        assert ids[0] == tok.bos_token_id
        assert tok.eos_token_id in ids
        assert tok.unk_token_id not in ids[1 : ids.index(tok.eos_token_id)]
    # SD3's CLIP-G tokenizer pads with "!" rather than with eos.
    assert tiny.tokenizer_2.pad_token == "!"

    t5 = tiny.tokenizer_3
    assert len(t5) <= tiny.text_encoder_3.config.vocab_size
    ids = t5(PROMPT, padding="max_length", max_length=256, truncation=True).input_ids
    assert len(ids) == 256
    assert ids.count(t5.eos_token_id) == 1
    assert ids[-1] == t5.pad_token_id


def test_same_seed_same_weights_and_image(tiny: StableDiffusion3Pipeline) -> None:
    torch.manual_seed(1234)
    expected_draw = torch.rand(3)
    torch.manual_seed(1234)
    again = build_random_pipeline("random:tiny", seed=0)
    # Building must not consume or reseed the caller's global RNG.
    assert torch.equal(torch.rand(3), expected_draw)

    for name in MODULES:
        a, b = getattr(tiny, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    np.testing.assert_array_equal(np.asarray(_generate(tiny)), np.asarray(_generate(again)))


def test_other_seed_other_weights(tiny: StableDiffusion3Pipeline) -> None:
    other = build_random_pipeline("random:tiny", seed=1)
    for name in MODULES:
        a, b = getattr(tiny, name).state_dict(), getattr(other, name).state_dict()
        assert any(not torch.equal(a[k], b[k]) for k in a), name


def test_save_and_reload_roundtrip(tiny: StableDiffusion3Pipeline, tmp_path: Path) -> None:
    tiny.save_pretrained(tmp_path)
    loaded = StableDiffusion3Pipeline.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.tokenizer.model_max_length == 77
    assert loaded.tokenizer_2.pad_token == "!"
    assert loaded.tokenizer_3(PROMPT).input_ids == tiny.tokenizer_3(PROMPT).input_ids
    assert loaded.tokenizer(PROMPT).input_ids == tiny.tokenizer(PROMPT).input_ids
    for name in MODULES:  # every weight comes back exactly
        saved, read = getattr(tiny, name).state_dict(), getattr(loaded, name).state_dict()
        assert saved.keys() == read.keys() and all(torch.equal(saved[k], read[k]) for k in saved), name
    # The same image, once the weights sit where freshly allocated ones do: the loaded tensors are views into the
    # memory-mapped file at its offsets, and on some CPUs the kernels round differently on memory aligned otherwise
    # (a pixel off by one, measured on this project's CI machines), though every weight is equal.
    with torch.no_grad():
        for name in MODULES:
            for tensor in [*getattr(loaded, name).parameters(), *getattr(loaded, name).buffers()]:
                tensor.data = tensor.data.clone()
    np.testing.assert_array_equal(np.asarray(_generate(tiny, 64, 64)), np.asarray(_generate(loaded, 64, 64)))


def test_bfloat16_build(tiny: StableDiffusion3Pipeline) -> None:
    pipe = build_random_pipeline("random:tiny", dtype=torch.bfloat16)
    for name in MODULES:
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {torch.bfloat16}


def test_sd35_medium_shapes_on_meta() -> None:
    pipe = build_random_pipeline("random:sd3.5-medium", device="meta", dtype=torch.bfloat16)
    assert all(p.device.type == "meta" for name in MODULES for p in getattr(pipe, name).parameters())

    transformer = pipe.transformer
    # 2.24B parameters; the fixed sin-cos position table (a 226M-element buffer that
    # the checkpoint stores too) brings it to the advertised ~2.5B.
    assert _n_params(transformer) == pytest.approx(2.2432e9, rel=1e-3)
    assert sum(v.numel() for v in transformer.state_dict().values()) == pytest.approx(2.4697e9, rel=1e-3)
    assert transformer.config.dual_attention_layers == tuple(range(13))
    assert pipe.default_sample_size * pipe.vae_scale_factor == 1024

    assert _n_params(pipe.vae) == pytest.approx(83.8e6, rel=1e-2)
    assert _n_params(pipe.text_encoder) == pytest.approx(123.65e6, rel=1e-3)  # CLIP-L
    assert _n_params(pipe.text_encoder_2) == pytest.approx(694.7e6, rel=1e-3)  # CLIP-G
    assert _n_params(pipe.text_encoder_3) == pytest.approx(4.7623e9, rel=1e-3)  # T5-XXL
    assert pipe.scheduler.config.shift == 3.0


def test_float16_keeps_t5_wo_in_fp32() -> None:
    # Same rule as transformers' from_pretrained(torch_dtype=torch.float16) for T5.
    pipe = build_random_pipeline("random:sd3.5-medium", device="meta", dtype=torch.float16)
    fp32 = {n for n, p in pipe.text_encoder_3.named_parameters() if p.dtype == torch.float32}
    assert fp32
    assert all(n.endswith("DenseReluDense.wo.weight") for n in fp32)
    assert pipe.transformer.dtype == torch.float16

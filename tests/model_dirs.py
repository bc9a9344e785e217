"""Random-weight SD3 models saved to disk as a family, for the tests of several models in one server.

``save_family(root, preset="random:tiny")`` writes three ``save_pretrained`` directories of a random preset
(``random:encoder-heavy`` for memory measurements: its shared encoders and VAE outweigh its transformer):

- ``large`` and ``medium`` hold the same text encoders and VAE (byte-identical files: ``medium``'s are copies of
  ``large``'s) and differ in their transformers (built from other seeds);
- ``other`` differs in everything (every component from another seed).

Loading them with diffusers' own ``StableDiffusion3Pipeline.from_pretrained`` is the reference for each model's
images. Nothing is downloaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

__all__ = ["ENCODERS_AND_VAE", "FAMILY", "save_family"]

FAMILY = ("large", "medium", "other")
ENCODERS_AND_VAE = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")


def _build(seed: int, preset: str) -> object:
    from models.random_build import build_random_pipeline

    return build_random_pipeline(preset, device="cpu", dtype=torch.float32, seed=seed)


def save_family(root: Path, preset: str = "random:tiny") -> dict[str, Path]:
    """Write the family under ``root`` (once: an existing family is reused) and return each model's directory."""
    paths = {name: root / name for name in FAMILY}
    if all((path / "model_index.json").exists() for path in paths.values()):
        return paths
    _build(0, preset).save_pretrained(paths["large"])
    _build(7, preset).save_pretrained(paths["other"])
    # medium: large's files for everything but the transformer, which comes from another seed's build.
    shutil.copytree(paths["large"], paths["medium"], dirs_exist_ok=True)
    shutil.rmtree(paths["medium"] / "transformer")
    _build(3, preset).transformer.save_pretrained(paths["medium"] / "transformer")
    return paths

"""What the server can load, below ``Pipelines.py`` (which loads it): the dtype names and the offline random-weight
presets (``random:tiny``, ``random:sd3.5-medium``).

Importing the package is light (no torch): ``models.presets`` and ``models.dtypes`` are plain data, and the
builders (``models.random_build``, ``models.random_tokenizers``) import torch, diffusers and transformers only when
imported themselves.
"""

from .dtypes import DTYPE_ALIASES
from .presets import RANDOM_PRESETS, is_random_preset

__all__ = ["DTYPE_ALIASES", "RANDOM_PRESETS", "is_random_preset"]

"""Several named models in one server: their specs, their shared components and the memory budget they live in.

Layer: ``api -> registry -> models / Pipelines``; nothing here imports ``api``, ``jobs`` or ``engine``, and nothing
here knows HTTP. Importing the package is light (no torch): torch loads with the first model.

- ``registry.specs``: ``ModelSpec``, ``parse_model_options`` (repeated ``--model NAME=SOURCE`` / ``SOURCE``),
  ``apply_flags`` (``--default`` / ``--preload`` / ``--pin`` by name), ``read_models_file`` (TOML ``[[model]]``).
- ``registry.memory``: ``parse_memory`` (``6GB``, ``500MB``, ``1.5GiB``, bytes, ``0.8`` or ``80%`` of the device),
  ``device_total``.
- ``registry.components``: content identity of a component, ``FileDigests``, ``ComponentCache``, ``nbytes``,
  ``Part``.
- ``registry.loader``: ``load_model(spec, options, device, dtype, cache, digests=None)``, ``plan_model``.
- ``registry.models``: ``ModelSet``, ``Resident``, ``ModelTooLarge``, ``ModelLoadFailed``, ``ModelsRefused``.
"""

from .memory import device_total, parse_memory
from .specs import ModelSpec, apply_flags, parse_model_options, read_models_file

__all__ = ["ModelSpec", "apply_flags", "device_total", "parse_memory", "parse_model_options", "read_models_file"]

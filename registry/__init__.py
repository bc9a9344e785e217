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

Where this differs from (or adds to) the interface agreed in issue 30's split:

- ``ModelSet(specs, load=None, *, budget, cpu_budget=0, device="cpu", dtype=None, options=None, build=None,
  close=None, digests_dir=None, estimate=None)``: ``load`` may be omitted (the default loads through the set's
  ``ComponentCache``, ``.cache``) and then ``dtype`` (None: the device's default) and ``options`` (a
  ``LoadOptions`` for every model) say how; ``digests_dir`` keeps the weight files' digests across restarts;
  ``estimate(spec) -> list[Part]`` is a custom ``load``'s estimate.
- ``on_state(listener)`` registers ``listener(name, state)``, called on the event loop (``.listeners`` the list).
- ``start()`` raises ``ModelsRefused`` (``.refused``: one ``ModelTooLarge`` per model that can never fit alone).
- ``async stop()`` unloads every model (``close`` on each served bundle), for a server's shutdown.
- ``acquire`` raises ``KeyError`` for a name that is not configured (``resolve`` first).
- ``apply_flags(specs, default=None, preload=(), pin=())`` marks the ``--preload`` / ``--pin`` names on the specs.
"""

from .memory import device_total, parse_memory
from .specs import ModelSpec, apply_flags, parse_model_options, read_models_file

__all__ = ["ModelSpec", "apply_flags", "device_total", "parse_memory", "parse_model_options", "read_models_file"]

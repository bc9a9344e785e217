"""A LoRA adapter from its file into the shared pipeline: which file, its state dict (checked), and the load itself
without the warnings diffusers and PEFT give for what is expected here.

Every load of an adapter into a pipeline that serves several says, through the libraries:

- diffusers (``diffusers.loaders.lora_base``): "No LoRA keys associated to CLIPTextModelWithProjection found with
  the prefix='text_encoder' ... open an issue", once per text encoder. Expected: only transformer adapters are
  served (``read_adapter`` refuses the others), so the text encoders never have keys.
- PEFT (``warnings.warn`` in ``peft.tuners.tuners_utils``): "Already found a `peft_config` attribute in the model
  ... Make sure to know what you are doing!", from the second adapter on. Expected: several adapters on one
  transformer is the pool's design.
- diffusers (``diffusers.utils.peft_utils``): "led to missing keys in the model: ..." naming only the keys of the
  adapters loaded before (its filter tests ``adapter_name in key``, so a short name such as ``b`` matches every
  ``transformer_blocks`` key). Expected when no key listed is this adapter's own.

``quiet_load`` leaves out exactly these, and only in the thread loading, while it loads: the same messages anywhere
else, and every other warning of the same loggers, still show.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["ADAPTER_SUFFIX", "adapter_file", "quiet_load", "read_adapter"]

ADAPTER_SUFFIX = ".safetensors"

_NO_TEXT_ENCODER_KEYS = re.compile(r"^No LoRA keys associated to \w+ found with the prefix='text_encoder\w*'")
_MISSING_KEYS = "Loading adapter weights from state_dict led to missing keys in the model: "
_PEFT_SEVERAL = r"Already found a `peft_config` attribute in the model"
_LOGGERS = ("diffusers.loaders.lora_base", "diffusers.utils.peft_utils")
_KEY_ADAPTER = re.compile(r"\.lora_(?:A|B|magnitude_vector)\.([^.]+)\.")


def adapter_file(path: Path) -> Path:
    """The adapter's ``.safetensors`` file: ``path`` itself, or the one such file in the folder ``path`` (diffusers'
    ``pytorch_lora_weights.safetensors`` when there are several). ValueError saying what is wrong otherwise."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise ValueError(f"{path}: no such file or directory")
    files = sorted(path.glob(f"*{ADAPTER_SUFFIX}"))
    if len(files) == 1:
        return files[0]
    preferred = path / f"pytorch_lora_weights{ADAPTER_SUFFIX}"
    if preferred in files:
        return preferred
    found = "none" if not files else ", ".join(f.name for f in files)
    raise ValueError(f"{path}: a folder must hold one {ADAPTER_SUFFIX} file (found {found})")


def read_adapter(pipeline_class: Any, path: Path) -> dict[str, Any]:
    """The adapter's state dict in diffusers' layout (community formats converted by diffusers' ``lora_state_dict``).
    ValueError with the reason when it cannot be read or holds more than transformer layers."""
    try:
        state = pipeline_class.lora_state_dict(str(adapter_file(path)))
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is the file's: say which and why
        raise ValueError(f"{path}: not a LoRA adapter diffusers can read ({type(exc).__name__}: {exc})") from None
    if isinstance(state, tuple):  # some diffusers versions also return the network alphas / metadata
        state = state[0]
    if not state:
        raise ValueError(f"{path}: holds no LoRA weights")
    foreign = sorted({key.split(".", 1)[0] for key in state if not key.startswith("transformer.")})
    if foreign:
        raise ValueError(
            f"{path}: has LoRA weights for {', '.join(foreign)}; only transformer adapters are supported "
            "(text-encoder LoRA is not)"
        )
    return state


class _Expected(logging.Filter):
    """Drops the expected records (see the module docstring) of the adapter the current thread is loading."""

    def __init__(self) -> None:
        super().__init__()
        self.loading = threading.local()  # .name: the adapter this thread is loading now (absent: none)

    def filter(self, record: logging.LogRecord) -> bool:
        name = getattr(self.loading, "name", None)
        if name is None:
            return True
        message = record.getMessage()
        if _NO_TEXT_ENCODER_KEYS.match(message):
            return False
        if message.startswith(_MISSING_KEYS) and "unexpected keys" not in message:
            keys = message.removeprefix(_MISSING_KEYS).rstrip(".").split(", ")
            owners = {match.group(1) if (match := _KEY_ADAPTER.search(key)) else None for key in keys}
            return name in owners or None in owners  # a key of its own (or one not understood): worth a look
        return True


_FILTER = _Expected()
_INSTALL = threading.Lock()  # installs the filter on the loggers once, whichever thread loads first


def _install() -> None:
    with _INSTALL:
        for name in _LOGGERS:
            target = logging.getLogger(name)
            if _FILTER not in target.filters:
                target.addFilter(_FILTER)


@contextlib.contextmanager
def quiet_load(name: str) -> Iterator[None]:
    """Around loading the adapter ``name`` into the pipeline: the expected warnings are left out, in this thread."""
    _install()
    _FILTER.loading.name = name
    try:
        # warnings' filters are process-wide (Python < 3.14): this one names the one message, so what another thread
        # warns meanwhile still shows; PEFT says it from any thread only when a further adapter is added, as here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_PEFT_SEVERAL, category=UserWarning)
            yield
    finally:
        del _FILTER.loading.name

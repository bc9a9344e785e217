"""What a pipeline component *is*, judged by content, and the cache that loads each one once.

An ``Identity`` is the component's class, its config (less the keys that name files, paths or library versions) and
a SHA-256 of its weights: of its weight files for a directory (never their names' parents or paths: a copy of a
directory elsewhere is the same component, one changed byte is another), or of its ``state_dict`` bytes for a module
built in memory (the ``random:`` presets). Hashing GBs takes seconds, so ``FileDigests`` keeps each file's digest by
(real path, size, mtime_ns) in memory and, given a directory, in a small JSON file there, so a restart re-hashes
nothing that did not change.

``ComponentCache`` holds one loaded object per identity and load options (dtype, device, quantization: its
``component_key``), with the names of the models that hold it; an entry goes when its last holder releases it.
Thread-safe: the loader thread fills it while the event loop reads its status.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "WEIGHT_SUFFIXES",
    "ComponentCache",
    "Entry",
    "FileDigests",
    "Identity",
    "Part",
    "component_key",
    "identity_of_dir",
    "identity_of_module",
    "nbytes",
]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
_CHUNK = 8 << 20
_DIGEST_FILE = "component-digests.json"


@dataclass(frozen=True)
class Identity:
    """A component's content: ``cls`` (library.Class), digests of its config and of its weights."""

    cls: str
    config: str
    weights: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.cls}\n{self.config}\n{self.weights}".encode()).hexdigest()

    @property
    def short(self) -> str:
        return self.digest[:12]


def component_key(identity: Identity, dtype: Any, device: Any, quantize: str | None) -> str:
    """The cache key of ``identity`` loaded in ``dtype`` on ``device``, quantized to ``quantize`` (or not)."""
    return f"{identity.digest}|{str(dtype).removeprefix('torch.')}|{device}|{quantize or 'none'}"


def _config_digest(config: Mapping[str, Any]) -> str:
    """The config's digest without the keys that say where it came from (``_name_or_path``, ``_class_name``,
    ``_diffusers_version``, ``transformers_version``): the same model saved by another version is the same model."""
    kept = {k: v for k, v in config.items() if not k.startswith("_") and not k.endswith("_version")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


class FileDigests:
    """SHA-256 of files, remembered by (real path, size, mtime_ns); persisted under ``directory`` when given."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self._path = Path(directory).expanduser() / _DIGEST_FILE if directory else None
        self._lock = threading.Lock()  # protects _known (the loader thread hashes; a status call may read)
        self._known: dict[str, tuple[int, int, str]] = {}
        if self._path and self._path.is_file():
            with contextlib.suppress(OSError, ValueError, TypeError):
                saved = json.loads(self._path.read_text())
                self._known = {path: (int(s), int(m), str(d)) for path, (s, m, d) in saved.items()}
        self.hashed = 0  # bytes hashed by this process (a restart with the file hashes none again)

    def digest(self, path: str | Path) -> str:
        real = os.path.realpath(path)  # a hub snapshot links into its blobs: the blob is the file
        stat = os.stat(real)
        with self._lock:
            known = self._known.get(real)
        if known and known[:2] == (stat.st_size, stat.st_mtime_ns):
            return known[2]
        sha = hashlib.sha256()
        with open(real, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                sha.update(chunk)
        digest = sha.hexdigest()
        with self._lock:
            self._known[real] = (stat.st_size, stat.st_mtime_ns, digest)
            self.hashed += stat.st_size
        self._save()
        return digest

    def _save(self) -> None:
        if self._path is None:
            return
        with self._lock:
            text = json.dumps({path: list(value) for path, value in self._known.items()})
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self._path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(text)
            temporary.replace(self._path)  # atomic: a reader sees the old file or the new one
        except OSError as exc:  # a cache of digests is an optimisation, never a reason to fail a load
            logger.warning("cannot write %s: %s", self._path, exc)


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a component's folder, sorted by name (sharded checkpoints keep their order)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def identity_of_dir(folder: Path, cls: str, digests: FileDigests) -> Identity:
    """The identity of the component saved in ``folder`` (its config.json and weight files) of class ``cls``."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    sha = hashlib.sha256()
    for path in weight_files(folder):
        sha.update(f"{path.name}:{digests.digest(path)}\n".encode())
    return Identity(cls, _config_digest(config), sha.hexdigest())


def _module_config(module: Any) -> Mapping[str, Any]:
    config = getattr(module, "config", None)
    if config is None:
        return {}
    if hasattr(config, "to_dict"):  # transformers' PretrainedConfig
        return config.to_dict()
    return dict(config)  # diffusers' FrozenDict


def identity_of_module(module: Any) -> Identity:
    """The identity of a module built in memory: its class, config and the bytes of its ``state_dict``."""
    import torch

    sha = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        data = tensor.detach()
        sha.update(f"{name}:{data.dtype}:{tuple(data.shape)}\n".encode())
        if data.numel():
            sha.update(data.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    cls = f"{type(module).__module__.split('.')[0]}.{type(module).__name__}"
    return Identity(cls, _config_digest(_module_config(module)), sha.hexdigest())


def _storages(tensor: Any, seen: dict[int, int]) -> None:
    inner = getattr(tensor, "__tensor_flatten__", None)
    if inner is not None and type(tensor).__name__ not in ("Parameter", "Tensor"):
        names, _ = tensor.__tensor_flatten__()  # a wrapper (quanto's quantized weights): count what it wraps
        for name in names:
            _storages(getattr(tensor, name), seen)
        return
    if tensor.device.type == "meta":
        return
    storage = tensor.untyped_storage()
    seen[storage.data_ptr()] = storage.nbytes()


def nbytes(module: Any) -> int:
    """The bytes a module's parameters and buffers hold, each storage counted once (tied weights share one)."""
    seen: dict[int, int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        _storages(tensor, seen)
    return sum(seen.values())


@dataclass(frozen=True)
class Part:
    """One weight-bearing component of a model, as the registry counts it: estimated before loading (``key`` None
    where the content is unknown until built), measured after."""

    component: str  # the pipeline's name for it: transformer, vae, text_encoder, ...
    key: str | None  # its ComponentCache key: the same key in two models is one object
    nbytes: int
    on_device: bool = True  # False: it lives elsewhere (--encoders-device cpu on a GPU) and is not on the budget
    module: Any = field(default=None, compare=False, repr=False)  # the loaded object (None: an estimate)


@dataclass
class Entry:
    """One loaded component and the models holding it."""

    key: str
    identity: Identity
    module: Any
    nbytes: int
    holders: set[str] = field(default_factory=set)


class ComponentCache:
    """One loaded object per ``component_key``, reference-counted by the names of the models that hold it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # protects _entries and each entry's holders (loader thread vs status)
        self._entries: dict[str, Entry] = {}

    def take(self, key: str, holder: str) -> Any | None:
        """The loaded object of ``key`` (now also held by ``holder``), or None when none is loaded."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            entry.holders.add(holder)
            return entry.module

    def put(self, key: str, identity: Identity, module: Any, holder: str) -> Any:
        """Keep ``module`` as ``key``'s object, held by ``holder``; returns the object kept (an identical one put
        meanwhile wins, so that there is only ever one)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = Entry(key, identity, module, nbytes(module))
            entry.holders.add(holder)
            return entry.module

    def release(self, holder: str) -> list[Entry]:
        """``holder`` holds nothing any more; returns the entries that no model holds now (dropped from the cache)."""
        with self._lock:
            dropped = []
            for key, entry in list(self._entries.items()):
                entry.holders.discard(holder)
                if not entry.holders:
                    dropped.append(self._entries.pop(key))
            return dropped

    def key_of(self, module: Any) -> str | None:
        """The key under which this very object is cached (None: it is not)."""
        with self._lock:
            return next((e.key for e in self._entries.values() if e.module is module), None)

    def entries(self) -> list[Entry]:
        """A snapshot of the entries (the holders copied)."""
        with self._lock:
            return [Entry(e.key, e.identity, e.module, e.nbytes, set(e.holders)) for e in self._entries.values()]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

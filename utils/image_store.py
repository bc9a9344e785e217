"""The image store: atomic saves, safe lookups, retention; and public URL building.

Security notes, next to the checks they justify:
- Only names the store itself generates (32 hex digits + ``.png``, ``.jpg`` or ``.webp``) are ever looked up, so
  ``..``, ``/``, ``%2F``-decoded slashes and NUL bytes are refused before the file system is touched. The extension
  is part of the name, so an image is served with the media type of the format it was saved in.
- The resolved real path must lie inside the store's directory and the entry must be a regular file that is not
  a symlink: a link planted in the directory can't be used to read other files.
- Files are written to a temporary name in the same directory and renamed into place, so a reader never sees a
  half-written image.
- Images are served from a descriptor opened before the answer starts (``open_image``): retention may unlink the
  name meanwhile, the open file stays whole, so an answer is never a 500 nor a body cut short.
- Retention never deletes an image younger than ``grace_seconds``: every URL handed out stays fetchable at least
  that long. The caps may therefore be exceeded by the images saved within the last grace period, never more.
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_COMPRESSION",
    "FORMATS",
    "IMAGE_NAME",
    "MEDIA_TYPES",
    "Encoding",
    "ImageStore",
    "build_image_url",
    "encode_png",
    "media_type_of",
]

# OpenAI's format names -> the extension a stored image gets, and the media type it is served with.
FORMATS: dict[str, tuple[str, str]] = {
    "png": ("png", "image/png"),
    "jpeg": ("jpg", "image/jpeg"),
    "webp": ("webp", "image/webp"),
}
MEDIA_TYPES: dict[str, str] = dict(FORMATS.values())  # extension -> media type
# \Z, not $: "$" also matches before a trailing newline, and "<name>.png\n" is not a name the store made.
IMAGE_NAME = re.compile(r"^[0-9a-f]{32}\.(?:" + "|".join(MEDIA_TYPES) + r")\Z")
TEMP_PREFIX = ".tmp-"
STALE_TEMP_SECONDS = 3600.0
# OpenAI's output_compression is a compression level in percent: higher gives smaller files. 10 keeps what the server
# always did for PNG (zlib level 1: the images are noise-like and large, so harder levels cost time and save little)
# and gives JPEG and WebP a quality of 90.
DEFAULT_COMPRESSION = 10


@dataclass(frozen=True)
class Encoding:
    """How images are encoded: an OpenAI ``output_format`` and ``output_compression`` (0-100, higher: smaller).

    JPEG and WebP are lossy: their quality is ``100 - compression``. PNG is lossless: the pixels never change, and the
    compression picks the zlib level (0 stores, 100 is level 9), trading encoding time for size.
    """

    format: str = "png"
    compression: int = DEFAULT_COMPRESSION

    def __post_init__(self) -> None:
        if self.format not in FORMATS or not 0 <= self.compression <= 100:
            raise ValueError(f"unsupported encoding {self.format!r} at compression {self.compression}")

    @property
    def extension(self) -> str:
        return FORMATS[self.format][0]

    @property
    def media_type(self) -> str:
        return FORMATS[self.format][1]

    def encode(self, image: Any) -> bytes:
        """The PIL ``image`` encoded in this format."""
        buffer = io.BytesIO()
        if self.format == "png":
            image.save(buffer, format="PNG", compress_level=round(self.compression * 9 / 100))
        else:
            # Neither format takes every PIL mode (JPEG has no alpha); SD3's images are RGB already.
            rgb = image if image.mode in ("RGB", "L") else image.convert("RGB")
            rgb.save(buffer, format=self.format.upper(), quality=100 - self.compression)
        return buffer.getvalue()


def encode_png(image: Any) -> bytes:
    """Encode a PIL image as PNG bytes at the default compression."""
    return Encoding().encode(image)


def media_type_of(name: str) -> str:
    """The media type of a stored image's name (one ``IMAGE_NAME`` matches)."""
    return MEDIA_TYPES[name.rsplit(".", 1)[-1]]


def build_image_url(base_url: str, filename: str) -> str:
    """The absolute URL of a stored image under ``base_url`` (e.g. ``http://host:8500`` or a public URL)."""
    return f"{base_url.rstrip('/')}/images/{filename}"


class ImageStore:
    """A directory of generated images (PNG, JPEG, WebP), with retention by age, count and total size (0: no limit)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        ttl_seconds: float = 0,
        max_files: int = 0,
        max_bytes: int = 0,
        grace_seconds: float = 0,
    ) -> None:
        self.directory = Path(directory).expanduser().resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ttl_seconds = ttl_seconds
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.grace_seconds = grace_seconds
        # Protects _index and _bytes: saves come from several threads at once, pruning from the event loop.
        self._lock = threading.Lock()
        self._index: OrderedDict[str, tuple[float, int]] = OrderedDict()  # name -> (mtime, size), oldest first
        self._bytes = 0  # sum of the sizes in _index
        self._scan()

    def _scan(self) -> None:
        found = []
        stale = time.time() - STALE_TEMP_SECONDS
        for entry in os.scandir(self.directory):
            if IMAGE_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
                info = entry.stat(follow_symlinks=False)
                found.append((info.st_mtime, entry.name, info.st_size))
            elif (
                entry.name.startswith(TEMP_PREFIX)
                and entry.is_file(follow_symlinks=False)
                and entry.stat(follow_symlinks=False).st_mtime < stale
            ):
                # Left by a process killed mid-write. Only old ones: another server may share the directory and be
                # writing this very moment.
                with _suppress_oserror():
                    os.unlink(entry.path)
        for mtime, name, size in sorted(found):
            self._index[name] = (mtime, size)
            self._bytes += size

    @property
    def total_bytes(self) -> int:
        """Bytes held by the stored images."""
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def save_png(self, data: bytes) -> str:
        """Write PNG bytes atomically under a new unguessable name and return the name."""
        return self.save(data, "png")

    def save(self, data: bytes, extension: str) -> str:
        """Write encoded image bytes atomically under a new unguessable name ending in ``extension`` (``png``,
        ``jpg`` or ``webp``) and return the name."""
        if extension not in MEDIA_TYPES:
            raise ValueError(f"unknown image extension {extension!r}")
        name = f"{uuid.uuid4().hex}.{extension}"
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=TEMP_PREFIX, suffix=f".{extension}")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, self.directory / name)
        except BaseException:
            with _suppress_oserror():
                os.unlink(tmp)
            raise
        with self._lock:
            self._index[name] = (time.time(), len(data))
            self._bytes += len(data)
        self.prune()
        return name

    def open_image(self, name: str) -> tuple[BinaryIO, int] | None:
        """An open stored image and its size, or None for anything that is not one (see the module's notes)."""
        if not IMAGE_NAME.match(name):
            return None
        try:
            # O_NOFOLLOW: a symlink planted under a valid name is refused, not followed.
            # O_NONBLOCK: a FIFO planted under a valid name must not hang the open (no effect on regular files).
            flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(self.directory / name, flags)
        except OSError:
            return None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # dirs, devices, FIFOs
            os.close(fd)
            return None
        return os.fdopen(fd, "rb"), info.st_size

    def prune(self, now: float | None = None) -> int:
        """Delete images older than the TTL and the oldest beyond the file or byte cap, never one younger than the
        grace period; return how many went."""
        now = time.time() if now is None else now
        doomed: list[str] = []
        with self._lock:
            # _index is oldest first: stop at the first image too young for the rule at hand.
            while self._index:
                name, (mtime, size) = next(iter(self._index.items()))
                age = now - mtime
                expired = self.ttl_seconds > 0 and age >= self.ttl_seconds
                over_cap = (self.max_files > 0 and len(self._index) > self.max_files) or (
                    self.max_bytes > 0 and self._bytes > self.max_bytes
                )
                if not (expired or (over_cap and age >= self.grace_seconds)):
                    break
                del self._index[name]
                self._bytes -= size
                doomed.append(name)
        for name in doomed:
            with _suppress_oserror():
                os.unlink(self.directory / name)
        if doomed:
            logger.debug("retention removed %d image(s)", len(doomed))
        return len(doomed)


class _suppress_oserror:  # noqa: N801 - used like contextlib.suppress, but logs
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc is not None and isinstance(exc, OSError):
            logger.warning("file clean-up failed: %s", exc)
            return True
        return False

"""The image store: atomic saves, safe lookups, retention; and public URL building.

Security notes, next to the checks they justify:
- Only names the store itself generates (32 hex digits + ``.png``) are ever looked up, so ``..``, ``/``,
  ``%2F``-decoded slashes and NUL bytes are refused before the file system is touched.
- The resolved real path must lie inside the store's directory and the entry must be a regular file that is not
  a symlink: a link planted in the directory can't be used to read other files.
- Files are written to a temporary name in the same directory and renamed into place, so a reader never sees a
  half-written PNG.
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
from pathlib import Path
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

__all__ = ["ImageStore", "build_image_url", "encode_png"]

IMAGE_NAME = re.compile(r"^[0-9a-f]{32}\.png$")
TEMP_PREFIX = ".tmp-"
STALE_TEMP_SECONDS = 3600.0


def encode_png(image: Any) -> bytes:
    """Encode a PIL image as PNG bytes (fast compression: the images are noise-like and large)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def build_image_url(base_url: str, filename: str) -> str:
    """The absolute URL of a stored image under ``base_url`` (e.g. ``http://host:8500`` or a public URL)."""
    return f"{base_url.rstrip('/')}/images/{filename}"


class ImageStore:
    """A directory of generated PNGs with retention by age, by count and by total size (0: no limit)."""

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
        name = f"{uuid.uuid4().hex}.png"
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=TEMP_PREFIX, suffix=".png")
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

"""The image's HEALTHCHECK: exit 0 when ``GET /ready`` answers 200 on this container's port, else 1.

The standard library only: the image has Python, not curl. The port is ``SERVER_PORT``'s (the image sets 8500), so a
container that serves elsewhere sets the port that way rather than with ``--port``.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('SERVER_PORT', '8500')}/ready"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - a fixed loopback URL
            return 0 if response.status == 200 else 1
    except OSError:  # refused, timed out, or an HTTP error status (503 while loading or draining)
        return 1


if __name__ == "__main__":
    sys.exit(main())

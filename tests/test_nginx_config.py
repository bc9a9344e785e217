"""deploy/nginx_config.py: the reverse proxy's configuration carries the server's limits, and nginx accepts it.

The same configuration in front of a real Ray cluster is tested in tests/test_ray_serve.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from nginx_helpers import NginxProcess, nginx_binary

from api import Settings
from deploy.nginx_config import render


def test_the_nginx_configuration_carries_the_servers_limits_and_nginx_accepts_it(tmp_path: Path) -> None:
    settings = Settings(max_header_bytes=8192, keep_alive_timeout=4, receive_timeout=20, max_body_bytes=70000)
    text = render(settings, "127.0.0.1:9999", ["10.0.0.1:8000", "10.0.0.2:8000"])
    for line in (
        "large_client_header_buffers 1 8192;",
        "client_header_timeout 4s;",  # the idle limit and the head's deadline: the stricter
        "client_body_timeout 20s;",
        "keepalive_timeout 4s;",
        "client_max_body_size 70000;",
        "limit_conn sd3_in_flight 2048;",
        "server 10.0.0.2:8000;",
        'proxy_set_header X-Request-Timeout-Seconds "";',
    ):
        assert line in text, line
    assert "{{" not in text
    body = json.loads(re.search(r"return 431 '(.*)';", text).group(1))
    assert set(body["error"]) == {"message", "type", "param", "code"} and "8192" in body["error"]["message"]
    for folder in ("logs", "temp"):  # the prefix nginx runs in: its logs and its temp files
        (tmp_path / folder).mkdir()
    (tmp_path / "nginx.conf").write_text(text)
    checked = subprocess.run(
        [nginx_binary(), "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", "stderr"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stderr


class _EchoHeaders(BaseHTTPRequestHandler):
    """An upstream standing in for Ray's proxy: answers with the request headers it received, as JSON."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


def test_nginx_drops_the_headers_rays_proxy_would_obey_and_passes_the_clients_host(tmp_path: Path) -> None:
    """Ray's proxy lets any client switch its request timeout off (X-Request-Timeout-Seconds: 0) and keep a
    generation running after the client left (X-Request-Disconnect-Disabled); in front of it, nginx must not pass
    either on. The client's Host goes through (image URLs are built from it)."""
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHeaders)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    nginx = NginxProcess(tmp_path, f"127.0.0.1:{upstream.server_address[1]}")
    try:
        nginx.wait_listening()
        sent = {
            "X-Request-Timeout-Seconds": "0",
            "X-Request-Disconnect-Disabled": "?1",
            "Host": "images.example.com",
            "X-Kept": "yes",
        }
        seen = httpx.get(nginx.url + "/health", headers=sent, timeout=30).json()
        assert "x-request-timeout-seconds" not in seen and "x-request-disconnect-disabled" not in seen, seen
        assert seen["host"] == "images.example.com" and seen["x-kept"] == "yes", seen
    finally:
        nginx.stop()
        upstream.shutdown()


class _EchoBodyLength(_EchoHeaders):
    """An upstream answering POSTs with the length of the body it received."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        received = len(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        body = json.dumps({"received": received}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_routes_that_take_images_get_the_upload_limit_and_the_others_the_body_limit(tmp_path: Path) -> None:
    """An image upload is megabytes: behind nginx it must reach the server on the upload routes (the server checks
    the image), while every other route keeps the small JSON limit at the edge."""
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _EchoBodyLength)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    limits = {"max_body_bytes": 65536, "max_upload_bytes": 1_000_000}
    nginx = NginxProcess(tmp_path, f"127.0.0.1:{upstream.server_address[1]}", **limits)
    image_sized = b"x" * 300_000
    try:
        nginx.wait_listening()
        for path in ("/api/diffusers/inference", "/api/jobs", "/v1/images/edits", "/v1/images/variations"):
            answer = httpx.post(nginx.url + path, content=image_sized, timeout=30)
            assert answer.status_code == 200 and answer.json() == {"received": len(image_sized)}, (path, answer.text)
        for path, size in (("/v1/images/generations", 300_000), ("/v1/images/edits", 1_200_000)):
            refused = httpx.post(nginx.url + path, content=b"x" * size, timeout=30)
            assert refused.status_code == 413, (path, refused.status_code)
            assert refused.json()["error"]["code"] == "too_large"
    finally:
        nginx.stop()
        upstream.shutdown()

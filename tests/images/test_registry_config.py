"""Mirrors from the environment and the config file; retries with backoff on transient errors."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from imagehelpers import isolate_config
from support.registry import Registry, free_port

from cellvm.errors import RegistryUnavailable
from cellvm.images import ImageStore, RetryPolicy, parse_reference, pull
from cellvm.images.mirrors import load_mirror_config


def endpoints(reference: str) -> list[tuple[str, bool]]:
    return [(e.base_url, e.is_mirror) for e in load_mirror_config().endpoints(parse_reference(reference))]


def test_mirror_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_config(monkeypatch, tmp_path)
    monkeypatch.delenv("CELLVM_REGISTRY_FALLBACK")
    assert endpoints("node:24") == [("https://registry-1.docker.io", False)]
    assert endpoints("localhost:5000/x") == [("http://localhost:5000", False)]
    assert endpoints("127.0.0.1:5000/x") == [("http://127.0.0.1:5000", False)]
    assert endpoints("ghcr.io/x/y") == [("https://ghcr.io", False)]

    config = tmp_path / "registries.toml"
    config.write_text(
        '[registries."docker.io"]\nmirrors = ["127.0.0.1:6000", "https://mirror.example"]\n'
        '[registries."ghcr.io"]\nmirrors = ["http://127.0.0.1:7000"]\nfallback = false\n'
    )
    monkeypatch.setenv("CELLVM_REGISTRIES_CONFIG", str(config))
    assert endpoints("node:24") == [
        ("http://127.0.0.1:6000", True),
        ("https://mirror.example", True),
        ("https://registry-1.docker.io", False),
    ]
    assert endpoints("ghcr.io/x/y") == [("http://127.0.0.1:7000", True)]

    # the environment replaces the file's mirrors for the registries it names, and can forbid fallback
    monkeypatch.setenv("CELLVM_REGISTRY_MIRRORS", "http://127.0.0.1:5000, quay.io=http://127.0.0.1:5001")
    monkeypatch.setenv("CELLVM_REGISTRY_FALLBACK", "0")
    assert endpoints("node:24") == [("http://127.0.0.1:5000", True)]
    assert endpoints("quay.io/a/b") == [("http://127.0.0.1:5001", True)]
    assert endpoints("ghcr.io/x/y") == [("http://127.0.0.1:7000", True)]


@pytest.mark.anyio
async def test_mirror_from_the_config_file_after_a_dead_one(
    registry: Registry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, store: ImageStore
) -> None:
    isolate_config(monkeypatch, tmp_path)
    config = tmp_path / "registries.toml"
    dead = f"http://127.0.0.1:{free_port()}"
    config.write_text(f'[registries."docker.io"]\nmirrors = ["{dead}", "{registry.url}"]\nfallback = false\n')
    monkeypatch.setenv("CELLVM_REGISTRIES_CONFIG", str(config))
    image = await pull("busybox", store=store, retry=RetryPolicy(attempts=2, first_delay=0.01))
    assert image.config.argv == ("sh",)


class FlakyProxy:
    """Answers the first ``failures`` requests with 503, then relays to the real registry."""

    def __init__(self, upstream: str, failures: int) -> None:
        self.requests = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                proxy.requests += 1
                if proxy.requests <= failures:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "range")}
                upstream_response = httpx.get(upstream + self.path, headers=headers)
                self.send_response(upstream_response.status_code)
                for key in ("content-type", "docker-content-digest", "content-range"):
                    if key in upstream_response.headers:
                        self.send_header(key, upstream_response.headers[key])
                self.send_header("Content-Length", str(len(upstream_response.content)))
                self.end_headers()
                self.wfile.write(upstream_response.content)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky(registry: Registry, request: pytest.FixtureRequest) -> Iterator[FlakyProxy]:
    proxy = FlakyProxy(registry.url, request.param)
    yield proxy
    proxy.close()


@pytest.mark.anyio
@pytest.mark.parametrize("flaky", [2], indirect=True)
async def test_transient_errors_are_retried(
    flaky: FlakyProxy, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, store: ImageStore
) -> None:
    isolate_config(monkeypatch, tmp_path)
    image = await pull(f"{flaky.host}/library/busybox", store=store, retry=RetryPolicy(attempts=3, first_delay=0.01))
    assert image.config.argv == ("sh",)
    assert flaky.requests > 2


@pytest.mark.anyio
@pytest.mark.parametrize("flaky", [1000], indirect=True)
async def test_retries_give_up_with_registry_unavailable(
    flaky: FlakyProxy, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, store: ImageStore
) -> None:
    isolate_config(monkeypatch, tmp_path)
    with pytest.raises(RegistryUnavailable, match="after 4 tries"):
        await pull(f"{flaky.host}/library/busybox", store=store, retry=RetryPolicy(attempts=4, first_delay=0.01))
    assert flaky.requests == 4

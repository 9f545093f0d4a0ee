"""A real OCI registry for tests: Debian's `docker-registry` binary (distribution 2.8),
started with a config of our own on a free 127.0.0.1 port, storage in a temp dir.

    from support.registry import start_registry, push_layout

    with start_registry(tmp_path) as registry:              # no auth
        await push_layout(registry, layout_dir, "library/node", "24")
        env = registry.mirror_env()    # CELLVM_REGISTRY_MIRRORS=..., FALLBACK=0

    start_registry(tmp_path, auth="htpasswd", users={"alice": "secret"})  # Basic
    start_registry(tmp_path, auth="token", users={"alice": "secret"})     # Bearer via a test token server

Registry.stop() / .start() stop and restart it on the same port and storage,
for tests of a registry that goes away mid-pull. Only the processes started
here are ever signalled, by their PIDs. A missing binary fails loudly.

Pytest fixture for other suites (import it into a conftest.py):

    from support.registry import test_images_registry   # session-scoped, all test images pushed

    def test_x(test_images_registry, monkeypatch):
        for key, value in test_images_registry.mirror_env().items():
            monkeypatch.setenv(key, value)
        image = await cellvm.images.pull("node:24")

Also: push_test_images(registry, only={"node", ...}) pushes some or all of the
test images (busybox, python, node, layers, config, multiarch, big) under
their docker names; test_images_dir() is where they are; kill_now() kills
the registry without waiting (safe in an event-loop callback);
docker_config(dir, user, password) writes credentials for it;
blob_data_path(digest) is where it stores a blob (to corrupt it). With
credentials=("alice", "secret"), pushes work against the secured kinds.
`python tests/support/registry.py` serves the test images until Ctrl-C.

Needs the test images built by scripts/stages/30-test-images.sh.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal

import httpx
import pytest

REGISTRY_BINARY = "docker-registry"
AuthMode = Literal["none", "htpasswd", "token"]


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.access(f"/usr/sbin/{name}", os.X_OK) else None)
    if path is None:
        raise RuntimeError(f"{name} is missing: install the Debian package {package} (scripts/apt/images.txt)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- token server ------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    """Signs registry JWTs (RS256, certificate in x5c) with a throwaway key made by openssl."""

    def __init__(self, directory: Path, service: str, issuer: str) -> None:
        self.service = service
        self.issuer = issuer
        self.key = directory / "token.key"
        self.cert = directory / "token.crt"
        openssl = require_tool("openssl", "openssl")
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=cellvm-test-token",
             "-keyout", str(self.key), "-out", str(self.cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        der = subprocess.run(
            [openssl, "x509", "-in", str(self.cert), "-outform", "DER"], check=True, capture_output=True
        ).stdout
        self._x5c = base64.b64encode(der).decode()
        self._openssl = openssl

    def token(self, subject: str, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]})
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "x5c": [self._x5c]}
        claims = {
            "iss": self.issuer, "sub": subject, "aud": self.service, "exp": now + 600, "nbf": now - 60,
            "iat": now, "jti": secrets.token_hex(8), "access": access,
        }  # fmt: skip
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(
            [self._openssl, "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(), check=True, capture_output=True,
        ).stdout  # fmt: skip
        return f"{signing_input}.{_b64url(signature)}"


class TokenServer:
    """GET /token?service=..&scope=.. with Basic credentials -> {"token": JWT}. Anonymous gets 401."""

    def __init__(self, issuer: TokenIssuer, users: dict[str, str]) -> None:
        self.issuer = issuer
        self.users = users
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.requests += 1
                url = urllib.parse.urlparse(self.path)
                query = urllib.parse.parse_qs(url.query)
                user = self._user()
                if url.path != "/token" or user is None:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps({"token": server.issuer.token(user, query.get("scope", []))}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _user(self) -> str | None:
                header = self.headers.get("Authorization", "")
                if not header.startswith("Basic "):
                    return None
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                return user if server.users.get(user) == password else None

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- the registry --------------------------------------------------------------------------


@dataclass
class Registry:
    directory: Path
    port: int
    auth: AuthMode = "none"
    users: dict[str, str] = field(default_factory=dict)
    token_server: TokenServer | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def storage(self) -> Path:
        return self.directory / "storage"

    def blob_data_path(self, digest: str) -> Path:
        """Where distribution's filesystem driver keeps a blob (tests corrupt it there)."""
        hex_part = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_part[:2] / hex_part / "data"

    def mirror_env(self) -> dict[str, str]:
        """Environment that makes docker.io names (node:24) resolve here and nowhere else."""
        return {"CELLVM_REGISTRY_MIRRORS": f"docker.io={self.url}", "CELLVM_REGISTRY_FALLBACK": "0"}

    def docker_config(self, directory: Path, user: str, password: str) -> Path:
        """Write a docker config.json with credentials for this registry; returns the directory (DOCKER_CONFIG)."""
        directory.mkdir(parents=True, exist_ok=True)
        auth = base64.b64encode(f"{user}:{password}".encode()).decode()
        (directory / "config.json").write_text(json.dumps({"auths": {self.host: {"auth": auth}}}))
        return directory

    def _write_config(self) -> Path:
        lines = [
            "version: 0.1",
            "log:",
            "  level: error",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: {self.host}",
            f"  secret: {secrets.token_hex(16)}",
        ]
        if self.auth == "htpasswd":
            htpasswd = require_tool("htpasswd", "apache2-utils")
            entries = [
                subprocess.run([htpasswd, "-Bbn", u, p], check=True, capture_output=True, text=True).stdout.strip()
                for u, p in self.users.items()
            ]
            (self.directory / "htpasswd").write_text("\n".join(entries) + "\n")
            lines += ["auth:", "  htpasswd:", "    realm: cellvm-test", f"    path: {self.directory / 'htpasswd'}"]
        elif self.auth == "token":
            assert self.token_server is not None
            issuer = self.token_server.issuer
            lines += [
                "auth:",
                "  token:",
                f"    realm: {self.token_server.url}",
                f"    service: {issuer.service}",
                f"    issuer: {issuer.issuer}",
                f"    rootcertbundle: {issuer.cert}",
            ]
        path = self.directory / "config.yml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 20.0) -> None:
        binary = require_tool(REGISTRY_BINARY, "docker-registry")
        config = self._write_config()
        log = open(self.directory / "registry.log", "ab")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {(self.directory / 'registry.log').read_text()[-2000:]}")
            try:
                httpx.get(f"{self.url}/v2/", timeout=1.0)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"docker-registry did not answer on {self.url} within {timeout} s")

    def stop(self) -> None:
        """Kill our registry process (by its PID) and wait for it."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def kill_now(self) -> None:
        """SIGKILL without waiting: safe to call from an event loop callback mid-transfer."""
        if self.process and self.process.poll() is None:
            self.process.kill()

    def close(self) -> None:
        self.stop()
        if self.token_server:
            self.token_server.close()


@contextmanager
def start_registry(
    directory: Path | None = None, *, auth: AuthMode = "none", users: dict[str, str] | None = None
) -> Iterator[Registry]:
    """Run a registry for the duration of the block; ``directory`` holds its config and storage."""
    own_dir = directory is None
    directory = Path(tempfile.mkdtemp(prefix="cellvm-registry-")) if directory is None else directory
    directory.mkdir(parents=True, exist_ok=True)
    token_server = None
    if auth == "token":
        token_server = TokenServer(TokenIssuer(directory, "cellvm-test-registry", "cellvm-test-issuer"), users or {})
    registry = Registry(directory, free_port(), auth, dict(users or {}), token_server)
    try:
        registry.start()
        yield registry
    finally:
        registry.close()
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)


# -- pushing -------------------------------------------------------------------------------


def _push_client(registry: Registry, credentials: tuple[str, str] | None) -> httpx.AsyncClient:
    from cellvm.images.auth import Credentials, RegistryAuth

    creds = Credentials(*credentials) if credentials else None
    return httpx.AsyncClient(base_url=registry.url, auth=RegistryAuth(creds), timeout=60.0)


async def push_layout(
    registry: Registry,
    layout: Path,
    repository: str,
    tag: str,
    *,
    layout_tag: str | None = None,
    credentials: tuple[str, str] | None = None,
) -> str:
    """Push the image tagged ``layout_tag`` (default: ``tag``, else the only one) in OCI layout
    ``layout`` as repository:tag. Returns the pushed manifest (or index) digest.
    Blobs the registry already has are skipped."""
    index = json.loads((layout / "index.json").read_text())
    wanted = layout_tag or tag
    entries = index["manifests"]
    tagged = [m for m in entries if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == wanted]
    if not tagged and len(entries) != 1:
        raise ValueError(f"{layout} has no image tagged {wanted!r}")
    top = (tagged or entries)[0]
    async with _push_client(registry, credentials) as client:
        await _push_document(client, layout, repository, top, tag)
    return top["digest"]


def test_images_dir() -> Path:
    """$CELLVM_CACHE/test-images/current, built by scripts/stages/30-test-images.sh."""
    cache = Path(os.environ.get("CELLVM_CACHE") or Path.home() / ".cache" / "cellvm")
    directory = cache / "test-images" / "current"
    if not (directory / "images.json").is_file():
        raise RuntimeError(f"no test images in {directory}: run scripts/stages/30-test-images.sh (./dev test does)")
    return directory.resolve()


async def push_test_images(
    registry: Registry, *, only: set[str] | None = None, credentials: tuple[str, str] | None = None
) -> None:
    """Push the test images (all, or those whose layout name is in ``only``: busybox, python, node,
    layers, config, multiarch, big) under their docker names (library/node:24, ...)."""
    images_dir = test_images_dir()
    for image in json.loads((images_dir / "images.json").read_text()):
        if only is None or image["layout"] in only:
            await push_layout(
                registry, images_dir / image["layout"], image["repository"], image["tag"], credentials=credentials
            )


@pytest.fixture(scope="session")
def test_images_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A session-wide plain-http registry holding every test image; use registry.mirror_env()."""
    import anyio

    with start_registry(tmp_path_factory.mktemp("registry")) as running:
        anyio.run(push_test_images, running)
        yield running


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


async def _push_document(
    client: httpx.AsyncClient, layout: Path, repository: str, descriptor: dict, reference: str
) -> None:
    raw = _blob(layout, descriptor["digest"]).read_bytes()
    document = json.loads(raw)
    for child in document.get("manifests") or ():
        await _push_document(client, layout, repository, child, child["digest"])
    for blob in [document["config"], *document["layers"]] if "config" in document else []:
        await _push_blob(client, layout, repository, blob["digest"])
    response = await client.put(
        f"/v2/{repository}/manifests/{reference}", content=raw, headers={"Content-Type": descriptor["mediaType"]}
    )
    response.raise_for_status()


async def _push_blob(client: httpx.AsyncClient, layout: Path, repository: str, digest: str) -> None:
    head = await client.head(f"/v2/{repository}/blobs/{digest}")
    if head.status_code == 200:
        return
    start = await client.post(f"/v2/{repository}/blobs/uploads/")
    start.raise_for_status()
    location = start.headers["Location"]
    path = _blob(layout, digest)
    size = path.stat().st_size

    async def body() -> AsyncIterator[bytes]:
        with open(path, "rb") as file:
            while chunk := file.read(1 << 20):
                yield chunk

    separator = "&" if "?" in location else "?"
    done = await client.put(
        f"{location}{separator}digest={digest}",
        content=body(),
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
    )
    done.raise_for_status()


def sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            hasher.update(block)
    return "sha256:" + hasher.hexdigest()


def serve_test_images() -> None:
    """`python tests/support/registry.py`: a registry with the test images until Ctrl-C, for trying
    `cellvm pull node:24` by hand; prints the environment that points docker.io at it."""
    import signal
    import sys

    import anyio

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "sdk"))
    with start_registry() as registry:
        anyio.run(push_test_images, registry)
        print("export " + " ".join(f"{k}={v}" for k, v in registry.mirror_env().items()), flush=True)
        print(f"# registry at {registry.url} with busybox, python:3.11, node:24; Ctrl-C stops it", flush=True)
        # Blocked first, so either signal ends the wait and the registry is stopped on the way out.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})


if __name__ == "__main__":
    serve_test_images()

"""A client for the OCI distribution API (pull side) on httpx.

One RegistryClient holds one httpx.AsyncClient per endpoint (auth is per
host). Requests that fail transiently (connection errors, timeouts, 5xx,
429) are retried with exponential backoff; what is still failing after the
last try becomes RegistryUnavailable. Blob downloads are retried by the
blob cache instead, because it resumes from the bytes it already has.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import anyio
import httpx

from cellvm.errors import AuthenticationError, DigestMismatch, ImageError, ImageNotFound, RegistryUnavailable
from cellvm.images.auth import RegistryAuth, load_credentials
from cellvm.images.manifest import ACCEPT
from cellvm.images.mirrors import Endpoint

T = TypeVar("T")

MAX_MANIFEST_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    first_delay: float = 0.2
    max_delay: float = 3.0

    def delays(self) -> list[float]:
        """Sleeps between attempts: 0.2, 0.4, 0.8, ... capped."""
        return [min(self.first_delay * 2**i, self.max_delay) for i in range(self.attempts - 1)]


class TransientError(Exception):
    """Internal: worth another try (the caller turns the last one into RegistryUnavailable)."""


class RangeNotSatisfiable(TransientError):
    """The source cannot serve from our offset: a partial download is not a prefix of the blob."""


def is_transient_status(status: int) -> bool:
    return status >= 500 or status in (408, 429)


def raise_for_status(response: httpx.Response, what: str) -> None:
    """Turn an HTTP status into our error tree; transient ones into TransientError."""
    status = response.status_code
    if status < 400:
        return
    if status == 404:
        raise ImageNotFound(f"{what}: not found ({response.request.url.host})")
    if status in (401, 403):
        raise AuthenticationError(f"{what}: access denied by {response.request.url.host} (HTTP {status})")
    if is_transient_status(status):
        raise TransientError(f"{what}: HTTP {status} from {response.request.url.host}")
    raise ImageError(f"{what}: HTTP {status} from {response.request.url.host}")


async def with_retries(policy: RetryPolicy, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
    delays = policy.delays()
    for index in range(policy.attempts):
        try:
            return await attempt()
        except (httpx.TransportError, TransientError) as exc:
            if index == len(delays):
                raise RegistryUnavailable(f"{what}: {describe_transport_error(exc)} (after {policy.attempts} tries)") from exc
            await anyio.sleep(delays[index])
    raise AssertionError("unreachable")


def describe_transport_error(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class RegistryClient:
    """Pull-side registry API. Use as ``async with RegistryClient() as client``."""

    def __init__(self, *, retry: RetryPolicy | None = None, timeout: float = 30.0) -> None:
        self.retry = retry or RetryPolicy()
        self._timeout = httpx.Timeout(timeout, connect=10.0)
        self._clients: dict[str, httpx.AsyncClient] = {}

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    async def _client(self, endpoint: Endpoint) -> httpx.AsyncClient:
        client = self._clients.get(endpoint.base_url)
        if client is None:
            credentials = await anyio.to_thread.run_sync(load_credentials, endpoint.host)
            client = httpx.AsyncClient(
                base_url=endpoint.base_url,
                # Plain-http endpoints never use TLS; loading the CA bundle would cost ~20 ms per pull.
                verify=endpoint.base_url.startswith("https://"),
                auth=RegistryAuth(credentials),
                timeout=self._timeout,
                follow_redirects=True,
                limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
                headers={"User-Agent": "cellvm"},
            )
            self._clients[endpoint.base_url] = client
        return client

    async def get_manifest(self, endpoint: Endpoint, repository: str, identifier: str) -> tuple[bytes, str, str]:
        """(raw bytes, content type, digest). A digest identifier is verified against the bytes."""
        client = await self._client(endpoint)
        what = f"manifest {repository}:{identifier} at {endpoint.host}"

        async def attempt() -> tuple[bytes, str]:
            response = await client.get(f"/v2/{repository}/manifests/{identifier}", headers={"Accept": ACCEPT})
            raise_for_status(response, what)
            if len(response.content) > MAX_MANIFEST_BYTES:
                raise ImageError(f"{what}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
            return response.content, response.headers.get("content-type", "")

        raw, content_type = await with_retries(self.retry, what, attempt)
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        if identifier.startswith("sha256:") and digest != identifier:
            raise DigestMismatch(f"{what}: content hashes to {digest}")
        return raw, content_type, digest

    @asynccontextmanager
    async def open_blob(
        self, endpoint: Endpoint, repository: str, digest: str, offset: int = 0
    ) -> AsyncIterator[tuple[httpx.Response, int]]:
        """Stream a blob from ``offset``; yields (response, offset actually served).

        The served offset is 0 when the server ignored the Range header.
        Raises TransientError/httpx.TransportError for the caller's retry loop.
        """
        client = await self._client(endpoint)
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        request = client.build_request("GET", f"/v2/{repository}/blobs/{digest}", headers=headers)
        response = await client.send(request, stream=True)
        try:
            if response.status_code == 416:
                # Our partial file is as long as (or longer than) the blob: start over.
                await response.aclose()
                raise RangeNotSatisfiable(f"blob {digest}: range {offset}- not satisfiable")
            raise_for_status(response, f"blob {digest} of {repository}")
            served = offset if response.status_code == 206 else 0
            yield response, served
        finally:
            await response.aclose()

"""Registry authentication: credentials from the docker config, and the
challenge/response dance (Basic, or Bearer tokens from a token realm).

The flow is an httpx.Auth, so the token request is just another request of
the same client and every request it signs goes through the same retries.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path

import httpx

from cellvm.errors import AuthenticationError, RegistryUnavailable
from cellvm.images.reference import DOCKER_HUB

# docker writes Docker Hub credentials under its v1 index URL.
_DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def basic_header(self) -> str:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return f"Basic {token}"


def docker_config_path() -> Path:
    return Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker") / "config.json"


def _normalize_host(key: str) -> str:
    key = re.sub(r"^[a-z]+://", "", key.strip())
    return key.split("/", 1)[0]


def load_credentials(registry: str, config_path: Path | None = None) -> Credentials | None:
    """Credentials for ``registry`` (host[:port]) from the docker config, if any.

    Blocking (reads a file, may run a credential helper): call it from a thread.
    """
    path = config_path or docker_config_path()
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    wanted = {registry} | (set(_DOCKER_HUB_KEYS) if registry == DOCKER_HUB else set())
    helper = (config.get("credHelpers") or {}).get(registry) or config.get("credsStore")
    for key, entry in (config.get("auths") or {}).items():
        if key in wanted or _normalize_host(key) in wanted:
            if entry.get("auth"):
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                return Credentials(user, password)
            if entry.get("username"):
                return Credentials(entry["username"], entry.get("password", ""))
    if helper:
        server = "https://index.docker.io/v1/" if registry == DOCKER_HUB else registry
        return _from_credential_helper(helper, server)
    return None


def _from_credential_helper(helper: str, server: str) -> Credentials | None:
    try:
        result = subprocess.run(
            [f"docker-credential-{helper}", "get"], input=server.encode(), capture_output=True, timeout=30
        )
        if result.returncode != 0:
            return None
        data = json.loads(result.stdout)
        return Credentials(data["Username"], data["Secret"])
    except (OSError, ValueError, KeyError, subprocess.TimeoutExpired):
        return None


_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """'Bearer realm="https://auth",service="reg",scope="repository:x:pull"' -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)) for m in _CHALLENGE_PARAM.finditer(rest)}
    return scheme.lower(), params


def _repository_of(url: httpx.URL) -> str | None:
    match = re.match(r"^/v2/(.+)/(?:manifests|blobs|tags)/", url.path)
    return match.group(1) if match else None


class RegistryAuth(httpx.Auth):
    """Answers 401 challenges; remembers bearer tokens per repository so only the first request pays."""

    def __init__(self, credentials: Credentials | None) -> None:
        self.credentials = credentials
        self._tokens: dict[str, str] = {}
        self._use_basic = False

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        repository = _repository_of(request.url) or ""
        self._sign(request, repository)
        response = yield request
        if response.status_code != 401:
            return
        header = response.headers.get("www-authenticate", "")
        scheme, params = parse_challenge(header)
        if scheme == "basic":
            if self.credentials is None:
                raise AuthenticationError(f"{request.url.host} wants a username and password (docker login)")
            if self._use_basic:
                raise AuthenticationError(f"{request.url.host} refused the credentials for {self.credentials.username!r}")
            self._use_basic = True
        elif scheme == "bearer" and "realm" in params:
            await response.aread()
            token_request = self._token_request(params, repository)
            token_response = yield token_request
            await token_response.aread()
            if token_response.status_code in (401, 403):
                raise AuthenticationError(
                    f"token server {token_request.url.host} refused"
                    f" {'the credentials' if self.credentials else 'anonymous access'} for {repository or 'the registry'}"
                )
            if token_response.status_code >= 500:
                raise RegistryUnavailable(f"token server {token_request.url.host}: HTTP {token_response.status_code}")
            if token_response.status_code >= 400:
                raise AuthenticationError(f"token server {token_request.url.host}: HTTP {token_response.status_code}")
            try:
                body = token_response.json()
                self._tokens[repository] = body.get("token") or body["access_token"]
            except (ValueError, KeyError) as exc:
                raise AuthenticationError(f"token server {token_request.url.host} sent no token") from exc
        else:
            raise AuthenticationError(f"{request.url.host} sent an unsupported challenge {header!r}")
        self._sign(request, repository)
        response = yield request
        if response.status_code == 401:
            raise AuthenticationError(
                f"{request.url.host} refused access to {repository or 'the registry'}"
                " (the repository may not exist, or needs other credentials)"
            )

    def _sign(self, request: httpx.Request, repository: str) -> None:
        token = self._tokens.get(repository)
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        elif self._use_basic and self.credentials:
            request.headers["Authorization"] = self.credentials.basic_header()

    def _token_request(self, params: dict[str, str], repository: str) -> httpx.Request:
        query = {}
        if "service" in params:
            query["service"] = params["service"]
        scope = params.get("scope") or (f"repository:{repository}:pull" if repository else "")
        if scope:
            query["scope"] = scope
        headers = {}
        if self.credentials:
            headers["Authorization"] = self.credentials.basic_header()
        return httpx.Request("GET", params["realm"], params=query, headers=headers)

"""Basic auth against an htpasswd registry, and bearer tokens from a token realm,
with credentials taken from a docker config.json."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from imagehelpers import isolate_config
from support.registry import Registry, push_test_images, start_registry

from cellvm.errors import AuthenticationError
from cellvm.images import ImageStore, pull

pytestmark = pytest.mark.anyio
USERS = {"alice": "wonderland"}


@pytest.fixture(params=["htpasswd", "token"])
async def secured_registry(request: pytest.FixtureRequest, images_dir: Path, tmp_path: Path) -> Iterator[Registry]:
    with start_registry(tmp_path / "registry", auth=request.param, users=USERS) as registry:
        await push_test_images(registry, only={"config"}, credentials=("alice", "wonderland"))
        yield registry


def use_registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, registry: Registry, password: str | None) -> None:
    isolate_config(monkeypatch, tmp_path)
    for key, value in registry.mirror_env().items():
        monkeypatch.setenv(key, value)
    if password is not None:
        monkeypatch.setenv("DOCKER_CONFIG", str(registry.docker_config(tmp_path / "docker", "alice", password)))


async def test_pull_with_credentials_from_docker_config(
    secured_registry: Registry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, store: ImageStore
) -> None:
    use_registry(monkeypatch, tmp_path, secured_registry, "wonderland")
    image = await pull("cellvm-test/config:user-name", store=store)
    assert image.config.user.uid == 1000
    if secured_registry.token_server:
        assert secured_registry.token_server.requests >= 1


async def test_pull_by_registry_host_name(
    secured_registry: Registry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, store: ImageStore
) -> None:
    # No mirror: the reference names the registry itself, reached over plain http as it is 127.0.0.1.
    use_registry(monkeypatch, tmp_path, secured_registry, "wonderland")
    monkeypatch.delenv("CELLVM_REGISTRY_MIRRORS")
    image = await pull(f"{secured_registry.host}/cellvm-test/config:cmd-only", store=store)
    assert image.config.argv == ("/bin/sh", "-c", "echo hi")


@pytest.mark.parametrize("password", [None, "wrong"], ids=["no-credentials", "wrong-password"])
async def test_refused_credentials_raise_authentication_error(
    secured_registry: Registry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, store: ImageStore, password: str | None
) -> None:
    use_registry(monkeypatch, tmp_path, secured_registry, password)
    with pytest.raises(AuthenticationError):
        await pull("cellvm-test/config:user-name", store=store)


async def test_credentials_from_a_docker_credential_helper(
    secured_registry: Registry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, store: ImageStore
) -> None:
    use_registry(monkeypatch, tmp_path, secured_registry, None)
    helper_dir = tmp_path / "bin"
    helper_dir.mkdir()
    helper = helper_dir / "docker-credential-cellvmtest"
    # The helper protocol: `get` reads the server on stdin and prints JSON credentials.
    helper.write_text(
        "#!/bin/sh\nread server\n"
        f'[ "$server" = "{secured_registry.host}" ] || exit 1\n'
        'echo \'{"ServerURL": "\'$server\'", "Username": "alice", "Secret": "wonderland"}\'\n'
    )
    helper.chmod(0o755)
    config_dir = tmp_path / "helper-config"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(f'{{"credHelpers": {{"{secured_registry.host}": "cellvmtest"}}}}')
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
    monkeypatch.setenv("PATH", f"{helper_dir}:{os.environ['PATH']}")
    image = await pull("cellvm-test/config:user-name", store=store)
    assert image.config.user.name == "app"

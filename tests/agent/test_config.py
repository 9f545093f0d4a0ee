"""The image config file: Env, WorkingDir and User as defaults for every exec."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from cellvm.agent import AgentClient

from support.agent_host import Launcher

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


async def test_image_config_defaults_and_overrides(
    launch_agent: Launcher, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # pytest's tmp_path is private to root; the image user (nobody) must enter this one
    workdir = Path(tempfile.mkdtemp(prefix="cellvm-agent-workdir-"))
    workdir.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(workdir))
    (workdir / "data.txt").write_bytes(b"relative")
    config = tmp_path / "config"
    records = [
        "env=PATH=/usr/local/bin:/usr/bin:/bin",
        "env=IMAGE_VAR=from image",
        f"workdir={workdir}",
        "user=nobody",
        "unknown-key=ignored",
    ]
    config.write_bytes(b"".join(r.encode() + b"\0" for r in records))
    process, stream = await launch_agent("--config", str(config))
    async with AgentClient(stream) as agent:
        result = await agent.exec("sh", "-c", 'echo "$IMAGE_VAR|$PATH|$(pwd)|$(id -un)|$HOME"')
        assert result.stdout.decode().strip().split("|") == [
            "from image", "/usr/local/bin:/usr/bin:/bin", str(workdir), "nobody", "/nonexistent",
        ]  # fmt: skip
        result = await agent.exec(
            "sh", "-c", 'echo "$IMAGE_VAR|$(pwd)|$(id -un)"', env={"IMAGE_VAR": "override"}, cwd="/", user="root"
        )
        assert result.stdout == b"override|/|root\n"
        assert (await agent.exec("id", "-u", uid=0)).stdout == b"0\n"  # an explicit uid beats the image user
        cleared = await agent.exec("/usr/bin/env", clear_env=True)
        assert sorted(cleared.stdout.decode().split()) == [
            "HOME=/nonexistent", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ]  # fmt: skip
        assert await agent.files.read("data.txt") == b"relative"  # relative to WorkingDir
    ignored = [line for line in process.log().splitlines() if "ignoring" in line]
    assert ignored == ["cellvm-agent: config: ignoring unknown key unknown-key"], process.log()

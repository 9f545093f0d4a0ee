"""The image's run configuration, with USER resolved against its own /etc/passwd and /etc/group."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cellvm.errors import ImageError

# What docker puts in PATH when the image sets none.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class User:
    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    name: str | None = None
    home: str = "/"


@dataclass(frozen=True)
class ImageConfig:
    """What a guest needs to start the image's process the way docker would."""

    env: dict[str, str] = field(default_factory=dict)
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    working_dir: str = "/"
    user: User = field(default_factory=lambda: User(0, 0, (), "root", "/root"))
    user_spec: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    stop_signal: str | None = None

    @property
    def argv(self) -> tuple[str, ...]:
        """ENTRYPOINT followed by CMD, as `docker run IMAGE` runs it."""
        return self.entrypoint + self.cmd

    def command_for(self, args: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
        """`docker run IMAGE ARGS...`: ARGS replace CMD, the ENTRYPOINT stays."""
        return self.entrypoint + tuple(args) if args else self.argv

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["user"] = asdict(self.user)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageConfig:
        user = data.get("user") or {}
        return cls(
            env=dict(data.get("env") or {}),
            entrypoint=tuple(data.get("entrypoint") or ()),
            cmd=tuple(data.get("cmd") or ()),
            working_dir=data.get("working_dir") or "/",
            user=User(
                uid=int(user.get("uid", 0)),
                gid=int(user.get("gid", 0)),
                additional_gids=tuple(user.get("additional_gids") or ()),
                name=user.get("name"),
                home=user.get("home") or "/",
            ),
            user_spec=data.get("user_spec") or "",
            labels=dict(data.get("labels") or {}),
            stop_signal=data.get("stop_signal"),
        )


def _read_image_file(root: Path, relative: str) -> str:
    """A small text file of the image, refusing symlinks so nothing outside the root is read."""
    path = root / relative
    try:
        st = os.lstat(path)
        parent = os.lstat(path.parent)
    except FileNotFoundError:
        return ""
    if not stat.S_ISREG(st.st_mode) or not stat.S_ISDIR(parent.st_mode):
        return ""
    return path.read_text(errors="replace")


def _table(text: str) -> list[list[str]]:
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def resolve_user(spec: str, root: Path) -> User:
    """USER as docker/runc resolve it: name or uid, optionally :group or :gid."""
    passwd = _table(_read_image_file(root, "etc/passwd"))
    groups = _table(_read_image_file(root, "etc/group"))
    user_part, _, group_part = (spec or "0").partition(":")

    entry = None
    for row in passwd:
        if len(row) >= 7 and (row[0] == user_part or (user_part.isdigit() and row[2] == user_part)):
            entry = row
            break
    if user_part.isdigit():
        uid = int(user_part)
    elif entry is not None:
        uid = int(entry[2])
    else:
        raise ImageError(f"USER {spec!r}: no user {user_part!r} in the image's /etc/passwd")
    name = entry[0] if entry else None
    home = entry[5] if entry else "/"

    if group_part:
        if group_part.isdigit():
            gid = int(group_part)
        else:
            match = next((row for row in groups if len(row) >= 3 and row[0] == group_part), None)
            if match is None:
                raise ImageError(f"USER {spec!r}: no group {group_part!r} in the image's /etc/group")
            gid = int(match[2])
    else:
        gid = int(entry[3]) if entry else 0
    additional = tuple(
        sorted(
            {int(row[2]) for row in groups if len(row) >= 4 and name and name in row[3].split(",") and int(row[2]) != gid}
        )
    )
    return User(uid=uid, gid=gid, additional_gids=additional, name=name, home=home)


def parse_env(items: list[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items or ():
        key, _, value = item.partition("=")
        if key:
            env[key] = value
    return env


def image_config_from_json(raw: bytes, root: Path) -> ImageConfig:
    """Turn the OCI config blob into an ImageConfig; ``root`` is the unpacked root filesystem."""
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise ImageError(f"image config is not JSON: {exc}") from exc
    config = document.get("config") or {}
    spec = config.get("User") or ""
    user = resolve_user(spec, root)
    env = parse_env(config.get("Env"))
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOME", user.home or "/")
    return ImageConfig(
        env=env,
        entrypoint=tuple(config.get("Entrypoint") or ()),
        cmd=tuple(config.get("Cmd") or ()),
        working_dir=config.get("WorkingDir") or "/",
        user=user,
        user_spec=spec,
        labels=dict(config.get("Labels") or {}),
        stop_signal=config.get("StopSignal"),
    )

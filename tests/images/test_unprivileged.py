"""Without root, the rootfs keeps the image's owners, device nodes and xattrs (through fakeroot)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import erofs_inode
from testimages import Entry, Layout, compress, tar_entries

from cellvm.images import ImageStore

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """pytest's tmp dirs are private to root; the unprivileged user needs one it can use."""
    directory = Path(tempfile.mkdtemp(prefix="cellvm-unprivileged-"))
    directory.chmod(0o777)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def unprivileged(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run as the current user if that is not root, else as nobody with a Python nobody can execute."""
    if os.geteuid() != 0:
        return subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=120)
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv is missing (util-linux)"
    # The venv's interpreter may live under /root; Debian's python3 of the same version with the
    # venv's packages on its path runs the same code as nobody.
    python = "/usr/bin/python3"
    assert os.path.exists(python), "/usr/bin/python3 is missing (Debian package python3)"
    env = {**env, "PYTHONPATH": f"{REPO / 'sdk'}:{sysconfig.get_paths()['purelib']}:{sysconfig.get_paths()['platlib']}"}
    command = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", python, *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def test_unprivileged_build_keeps_ownership_devices_and_xattrs(world_dir: Path) -> None:
    assert shutil.which("fakeroot"), "fakeroot is missing: install it (scripts/apt/images.txt)"
    layout = Layout(world_dir / "layout")
    lower = tar_entries(
        [
            Entry("ro", "dir", mode=0o555),
            Entry("owned", data=b"x", uid=1000, gid=50, mode=0o640),
            Entry("suid", data=b"x", mode=0o4755),
            Entry("dev", "dir"),
            Entry("dev/null", "chardev", mode=0o666, device=(1, 3)),
            Entry("xattr", data=b"x", xattrs={"user.cellvm": "kept"}),
        ]
    )
    upper = tar_entries([Entry("ro/later", data=b"written into a read-only directory of a lower layer")])
    layout.tag(layout.add_image([compress(lower), compress(upper)], {"Cmd": ["/suid"]}), "latest")
    for path in world_dir.rglob("*"):
        path.chmod(0o777 if path.is_dir() else 0o666)

    env = {"PATH": os.environ["PATH"], "HOME": str(world_dir), "CELLVM_CACHE": str(world_dir / "cache")}
    result = unprivileged(["-m", "cellvm.cli", "pull", f"oci:{world_dir / 'layout'}:latest"], env)
    assert result.returncode == 0, result.stderr
    image = ImageStore(world_dir / "cache" / "images").lookup(f"oci:{world_dir / 'layout'}:latest")
    assert image is not None
    assert os.stat(image.rootfs).st_uid == (65534 if os.geteuid() == 0 else os.geteuid()), "built by the unprivileged user"
    owned = erofs_inode(image, "/owned")
    assert (owned["Uid"], owned["Gid"]) == ("1000", "50")
    assert erofs_inode(image, "/ro")["Access"].startswith("0555")
    assert erofs_inode(image, "/ro/later")["Size"] == str(len(b"written into a read-only directory of a lower layer"))
    assert "char" in subprocess.run(["dump.erofs", "--path=/dev/null", str(image.rootfs)], capture_output=True, text=True).stdout
    assert erofs_inode(image, "/xattr")["Xattr size"] != "0"

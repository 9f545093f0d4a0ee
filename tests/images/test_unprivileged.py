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
from imagehelpers import erofs_inode
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


def importable_copy(destination: Path) -> Path:
    """cellvm and the packages it imports, copied where nobody can read them: the repository and
    the venv may sit under a directory only root can enter (/root/...)."""
    import cellvm.cli  # noqa: F401 - loads everything `cellvm pull` needs

    destination.mkdir()
    shutil.copytree(REPO / "sdk" / "cellvm", destination / "cellvm", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    site_dirs = {Path(p).resolve() for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])}
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None)
        if name.startswith("cellvm.") and origin and not Path(origin).resolve().is_relative_to(REPO / "sdk"):
            shutil.copy2(origin, destination / "cellvm" / Path(origin).name)  # a built extension (editable install)
            continue
        if "." in name or not origin or not any(Path(origin).resolve().is_relative_to(d) for d in site_dirs):
            continue
        source = Path(origin)
        if source.name == "__init__.py":
            shutil.copytree(source.parent, destination / source.parent.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, destination / source.name)
    for path in destination.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return destination


def unprivileged(argv: list[str], env: dict[str, str], world: Path) -> subprocess.CompletedProcess[str]:
    """Run as the current user if that is not root, else as nobody."""
    if os.geteuid() != 0:
        return subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=120)
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv is missing (util-linux)"
    # The venv's interpreter may live under /root too: Debian's python3 (the same 3.x, so the
    # copied C extensions load) runs the copied code as nobody.
    python = "/usr/bin/python3"
    assert os.path.exists(python), "/usr/bin/python3 is missing (Debian package python3)"
    env = {**env, "PYTHONPATH": str(importable_copy(world / "python"))}
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
    result = unprivileged(["-m", "cellvm.cli", "pull", f"oci:{world_dir / 'layout'}:latest"], env, world_dir)
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

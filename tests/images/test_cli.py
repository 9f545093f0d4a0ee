"""`cellvm pull | images | rm | prune`, run as a user runs them (not a terminal: no progress bars)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from support.registry import Registry

from cellvm.images import ImageStore


def cellvm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cellvm.cli", *args], env=env, capture_output=True, text=True, timeout=300)


def test_pull_images_rm_prune(mirror_env: Registry, tmp_path: Path) -> None:
    env = {**os.environ, "CELLVM_CACHE": str(tmp_path / "cache")}
    pulled = cellvm(env, "pull", "busybox")
    assert pulled.returncode == 0, pulled.stderr
    name, digest, rootfs = pulled.stdout.split()
    assert name == "busybox:latest" and digest.startswith("sha256:") and Path(rootfs).is_file()
    assert pulled.stderr == "", "no progress output when stderr is not a terminal"
    assert cellvm(env, "pull", "cellvm-test/config:cmd-only").returncode == 0

    listing = cellvm(env, "images").stdout.splitlines()
    assert listing[0].split() == ["NAME", "DIGEST", "SIZE", "AGE"]
    rows = {line.split()[0]: line for line in listing[1:]}
    assert set(rows) == {"busybox:latest", "cellvm-test/config:cmd-only"}
    assert digest[:19] in rows["busybox:latest"] and "just now" in rows["busybox:latest"]

    store = ImageStore(tmp_path / "cache" / "images")
    blobs_before = len(list(store.blobs.blobs_dir.iterdir()))
    assert cellvm(env, "rm", "docker.io/library/busybox:latest").returncode == 0
    pruned = cellvm(env, "prune")
    assert pruned.returncode == 0 and pruned.stdout.startswith("removed ")
    assert not Path(rootfs).exists()
    assert len(list(store.blobs.blobs_dir.iterdir())) < blobs_before
    assert [line.split()[0] for line in cellvm(env, "images").stdout.splitlines()[1:]] == ["cellvm-test/config:cmd-only"]
    # what is still named is still complete: a re-pull builds nothing and moves no blob
    again = cellvm(env, "pull", "cellvm-test/config:cmd-only")
    assert again.returncode == 0


def test_errors_are_one_line_and_exit_1(mirror_env: Registry, tmp_path: Path) -> None:
    env = {**os.environ, "CELLVM_CACHE": str(tmp_path / "cache")}
    missing = cellvm(env, "pull", "busybox:nope")
    assert missing.returncode == 1
    assert missing.stderr.startswith("cellvm pull: ImageNotFound:")
    invalid = cellvm(env, "pull", "Not/Valid")
    assert invalid.returncode == 1 and "InvalidReference" in invalid.stderr
    assert cellvm(env, "rm", "never-pulled").returncode == 1


def test_pull_shows_a_progress_bar_per_layer_on_a_terminal(mirror_env: Registry, tmp_path: Path) -> None:
    import pty

    env = {**os.environ, "CELLVM_CACHE": str(tmp_path / "cache"), "COLUMNS": "120", "TERM": "xterm",
           "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}  # fmt: skip
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "cellvm.cli", "pull", "node:24"], env=env, stdout=subprocess.PIPE, stderr=terminal
    )
    os.close(terminal)
    shown = b""
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        shown += data
    out, _ = process.communicate(timeout=120)
    os.close(controller)
    assert process.returncode == 0
    assert out.decode().startswith("node:24 sha256:")
    text = shown.decode(errors="replace")
    assert "━" in text and "verified" in text
    assert text.count("MB") >= 2, "each of the two layers has its own bar"
    assert "rootfs.erofs:" in text


def test_pull_options_platform_and_format(mirror_env: Registry, tmp_path: Path) -> None:
    env = {**os.environ, "CELLVM_CACHE": str(tmp_path / "cache")}
    pulled = cellvm(env, "pull", "--platform", "linux/arm64", "--format", "ext4", "cellvm-test/multiarch")
    assert pulled.returncode == 0, pulled.stderr
    rootfs = Path(pulled.stdout.split()[2])
    assert rootfs.name == "rootfs.ext4"
    debugfs = shutil.which("debugfs") or "/usr/sbin/debugfs"
    content = subprocess.run([debugfs, "-R", "cat /arch", str(rootfs)], capture_output=True, text=True, check=True)
    assert content.stdout == "arm64"
    bad = cellvm(env, "pull", "--platform", "linux", "cellvm-test/multiarch")
    assert bad.returncode == 1 and bad.stderr.startswith("cellvm pull: ImageError: platform 'linux'")

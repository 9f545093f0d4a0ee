"""Images from an OCI layout directory (ours, and one skopeo wrote) and from a docker-archive tarball."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import extract_rootfs
from support.registry import Registry

from cellvm.errors import ImageNotFound
from cellvm.images import ImageStore, pull

pytestmark = pytest.mark.anyio


def skopeo(*args: str) -> None:
    tool = shutil.which("skopeo")
    assert tool, "skopeo is missing: install the Debian package skopeo (scripts/apt/images.txt)"
    subprocess.run([tool, *args], check=True, capture_output=True)


async def test_oci_layout_by_tag(images_dir: Path, store: ImageStore) -> None:
    image = await pull(f"oci:{images_dir / 'config'}:entrypoint-and-cmd", store=store)
    assert image.config.argv == ("/bin/echo", "default", "args")
    assert image.name == f"oci:{images_dir / 'config'}:entrypoint-and-cmd"
    with pytest.raises(ImageNotFound):
        await pull(f"oci:{images_dir / 'config'}:no-such-tag", store=store)


async def test_layouts_and_archives_written_by_skopeo(
    mirror_env: Registry, store: ImageStore, tmp_path: Path
) -> None:
    # skopeo fetches busybox from the registry the way it does for real images
    layout, archive = tmp_path / "layout", tmp_path / "busybox.tar"
    skopeo("copy", "--src-tls-verify=false", f"docker://{mirror_env.host}/library/busybox:latest", f"oci:{layout}:latest")
    skopeo("copy", f"oci:{layout}:latest", f"docker-archive:{archive}:busybox:latest")

    from_registry = await pull("busybox", store=store)
    from_layout = await pull(str(layout), store=store)
    from_archive = await pull(f"docker-archive:{archive}", store=store)
    assert from_layout.digest == from_registry.digest  # the same manifest bytes, so the same cached rootfs
    assert from_archive.config.argv == ("sh",)
    registry_root = extract_rootfs(from_registry, tmp_path / "a")
    archive_root = extract_rootfs(from_archive, tmp_path / "b")
    assert sorted(p.name for p in (registry_root / "bin").iterdir()) == sorted(p.name for p in (archive_root / "bin").iterdir())
    assert (registry_root / "bin" / "busybox").read_bytes() == (archive_root / "bin" / "busybox").read_bytes()

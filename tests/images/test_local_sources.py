"""Images from an OCI layout directory (ours, and one skopeo wrote) and from a docker-archive tarball."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from imagehelpers import extract_rootfs
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


async def test_docker_schema2_manifests_and_manifest_lists(
    mirror_env: Registry, images_dir: Path, store: ImageStore, tmp_path: Path
) -> None:
    # skopeo rewrites our OCI images as Docker v2 schema 2 (and the index as a manifest list).
    skopeo("copy", "--all", "--format", "v2s2", "--dest-tls-verify=false",
           f"oci:{images_dir / 'multiarch'}:latest", f"docker://{mirror_env.host}/cellvm-test/multiarch-docker:latest")  # fmt: skip
    skopeo("copy", "--format", "v2s2", "--dest-tls-verify=false",
           f"oci:{images_dir / 'config'}:workdir-env", f"docker://{mirror_env.host}/cellvm-test/config-docker:latest")  # fmt: skip
    arm64 = await pull("cellvm-test/multiarch-docker", store=store, platform="linux/arm64")
    assert (extract_rootfs(arm64, tmp_path / "arm64") / "arch").read_text() == "arm64"
    documents = [p.read_bytes() for p in store.blobs.blobs_dir.iterdir() if p.stat().st_size < 4096]
    assert any(b"application/vnd.docker.distribution.manifest.list.v2+json" in d for d in documents)
    image = await pull("cellvm-test/config-docker", store=store)
    assert image.config.working_dir == "/home/app" and image.config.env["B"] == "x=y"
    manifest = store.blobs.read_bytes(image.digest).decode()
    assert "application/vnd.docker.distribution.manifest.v2+json" in manifest
    assert "application/vnd.docker.image.rootfs.diff.tar.gzip" in manifest

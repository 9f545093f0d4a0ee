"""pull(): reference -> verified blobs in the cache -> root filesystem image + run config.

    image = await pull("node:24")
    image.rootfs          # .../rootfs/<manifest hex>.erofs/rootfs.erofs
    image.config.argv     # ("node",)

A re-pull of a cached image asks the registry for the manifest only and
moves no blob; an interrupted pull is resumed by the next one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc

from cellvm.errors import ImageError
from cellvm.images.build import build_image
from cellvm.images.locks import file_lock
from cellvm.images.manifest import Descriptor, Platform, host_linux_platform
from cellvm.images.mirrors import load_mirror_config
from cellvm.images.progress import PullReporter
from cellvm.images.reference import parse_reference
from cellvm.images.registry import RegistryClient, RetryPolicy
from cellvm.images.rootfs import FORMATS, RootfsFormat
from cellvm.images.sources import ImageSource, RegistrySource, ResolvedManifest, local_source
from cellvm.images.store import Image, ImageStore

# Enough parallel layer downloads to fill a link, few enough not to thrash a small registry.
MAX_PARALLEL_BLOBS = 4


async def pull(
    image: str,
    *,
    platform: str | Platform | None = None,
    rootfs_format: RootfsFormat = "erofs",
    store: ImageStore | None = None,
    reporter: PullReporter | None = None,
    retry: RetryPolicy | None = None,
) -> Image:
    """Pull ``image`` (a reference like ``node:24``, ``oci:DIR[:TAG]``, ``docker-archive:FILE``)
    and return it with its root filesystem image built."""
    if rootfs_format not in FORMATS:
        raise ImageError(f"unknown rootfs format {rootfs_format!r}")
    store = store or ImageStore()
    reporter = reporter or PullReporter()
    retry = retry or RetryPolicy()
    async with store.in_use(), _resolve(image, platform, retry, reporter) as (source, resolved):
        cached = await anyio.to_thread.run_sync(store.load_image, source.name, resolved.digest, rootfs_format)
        await _store_documents(store, resolved)
        if cached is None:
            cached = await _fetch_and_build(store, source, resolved, rootfs_format, reporter, retry)
        else:
            for layer in resolved.manifest.layers:
                reporter.layer_cached(layer.digest, layer.size)
        # Named before the store lock is released, so a prune never sees it unnamed.
        await anyio.to_thread.run_sync(store.record, source.name, resolved.digest, rootfs_format, sorted(resolved.documents))
    reporter.done(cached)
    return cached


async def fetch(
    image: str,
    *,
    platform: str | Platform | None = None,
    store: ImageStore | None = None,
    reporter: PullReporter | None = None,
    retry: RetryPolicy | None = None,
) -> str:
    """Download and verify the image's blobs into the cache, without building a rootfs
    (to warm a cache ahead of time). Returns the manifest digest."""
    store = store or ImageStore()
    reporter = reporter or PullReporter()
    retry = retry or RetryPolicy()
    async with store.in_use(), _resolve(image, platform, retry, reporter) as (source, resolved):
        await _store_documents(store, resolved)
        await _fetch_blobs(store, source, resolved, reporter, retry)
    return resolved.digest


@asynccontextmanager
async def _resolve(
    image: str, platform: str | Platform | None, retry: RetryPolicy, reporter: PullReporter
) -> AsyncIterator[tuple[ImageSource, ResolvedManifest]]:
    wanted = Platform.parse(platform) if isinstance(platform, str) else platform or host_linux_platform()
    local = local_source(image)
    async with RegistryClient(retry=retry) as client:
        source: ImageSource
        if local is not None:
            source = local
        else:
            reference = parse_reference(image)
            mirrors = await anyio.to_thread.run_sync(load_mirror_config)
            source = RegistrySource(reference, client, mirrors.endpoints(reference))
        resolved = await source.resolve(wanted)
        reporter.resolved(source.name, resolved.digest)
        yield source, resolved


async def _store_documents(store: ImageStore, resolved: ResolvedManifest) -> None:
    """Keep the manifest (and index) bytes, so the cache holds everything the image is made of."""
    for digest, raw in resolved.documents.items():
        if not store.blobs.has(digest):
            await anyio.to_thread.run_sync(store.blobs.put_bytes, digest, raw)


async def _fetch_blobs(
    store: ImageStore,
    source: ImageSource,
    resolved: ResolvedManifest,
    reporter: PullReporter,
    retry: RetryPolicy,
    *,
    also: Callable[[Callable[[str], Awaitable[None]]], Awaitable[None]] | None = None,
) -> None:
    """Fetch config and layers concurrently; ``also(wait_for)`` runs alongside, able to wait for
    any one blob to arrive. The first failure, of a download or of ``also``, cancels the rest
    (partial downloads stay for the next pull) and is raised as itself, not in an exception group."""
    limiter = anyio.Semaphore(MAX_PARALLEL_BLOBS)
    arrived = {d.digest: anyio.Event() for d in (resolved.manifest.config, *resolved.manifest.layers)}
    failures: list[Exception] = []

    async def wait_for(digest: str) -> None:
        await arrived[digest].wait()

    async def fetch(descriptor: Descriptor, is_layer: bool, group: anyio.abc.TaskGroup) -> None:
        try:
            async with limiter:
                if is_layer:
                    reporter.layer_started(descriptor.digest, descriptor.size)
                moved = await store.blobs.ensure(
                    descriptor.digest,
                    descriptor.size,
                    source,
                    retry=retry,
                    on_progress=(lambda n: reporter.layer_advanced(descriptor.digest, n)) if is_layer else None,
                )
        except Exception as exc:
            failures.append(exc)
            group.cancel_scope.cancel()
            return
        arrived[descriptor.digest].set()
        if is_layer:
            if moved:
                reporter.layer_finished(descriptor.digest)
            else:
                reporter.layer_cached(descriptor.digest, descriptor.size)

    async def run_also(group: anyio.abc.TaskGroup) -> None:
        assert also is not None
        try:
            await also(wait_for)
        except Exception as exc:
            failures.append(exc)
            group.cancel_scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(fetch, resolved.manifest.config, False, group)
        for layer in resolved.manifest.layers:
            group.start_soon(fetch, layer, True, group)
        if also is not None:
            group.start_soon(run_also, group)
    if failures:
        raise failures[0]


async def _fetch_and_build(
    store: ImageStore,
    source: ImageSource,
    resolved: ResolvedManifest,
    fmt: RootfsFormat,
    reporter: PullReporter,
    retry: RetryPolicy,
) -> Image:
    """Download and build at once: each layer is unpacked as soon as it and those below it are here."""
    digest_hex = resolved.digest.split(":")[1]

    async def build(wait_for: Callable[[str], Awaitable[None]]) -> None:
        async with file_lock(store.blobs.locks_dir / f"rootfs-{digest_hex}.lock"):
            if await anyio.to_thread.run_sync(store.load_image, source.name, resolved.digest, fmt) is not None:
                return  # built by a concurrent pull while we waited for the lock
            reporter.building(fmt)
            staging = store.blobs.tmp_dir / f"build-{digest_hex}-{os.getpid()}"
            try:
                config = await build_image(store, resolved.digest, staging, fmt, wait_for=wait_for)
                layers = [d.digest for d in resolved.manifest.layers]
                await anyio.to_thread.run_sync(store.publish_rootfs, staging, resolved.digest, fmt, config, layers)
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(lambda: shutil.rmtree(staging, ignore_errors=True))

    await _fetch_blobs(store, source, resolved, reporter, retry, also=build)
    image = await anyio.to_thread.run_sync(store.load_image, source.name, resolved.digest, fmt)
    assert image is not None
    return image

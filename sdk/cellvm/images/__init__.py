"""OCI images: pull from a registry (or an OCI layout / docker-archive), cache
by digest, and build the guest's root filesystem image plus its run config.

    from cellvm.images import pull
    image = await pull("node:24")
"""

from cellvm.images.config import ImageConfig, User
from cellvm.images.manifest import Platform
from cellvm.images.progress import PullReporter
from cellvm.images.pull import fetch, pull
from cellvm.images.reference import Reference, parse_reference
from cellvm.images.registry import RetryPolicy
from cellvm.images.store import Image, ImageRecord, ImageStore

__all__ = [
    "Image",
    "ImageConfig",
    "ImageRecord",
    "ImageStore",
    "Platform",
    "PullReporter",
    "Reference",
    "RetryPolicy",
    "User",
    "fetch",
    "parse_reference",
    "pull",
]

"""Progress reporting for pulls: subclass PullReporter and override what you show.

Every method is called on the event loop thread, so a reporter never needs locks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cellvm.images.store import Image


class PullReporter:
    """Receives pull events; the base class ignores them all."""

    def resolved(self, name: str, digest: str) -> None:
        """The reference resolved to this manifest digest."""

    def layer_started(self, digest: str, size: int) -> None:
        """A layer download begins (size in bytes as the manifest declares)."""

    def layer_advanced(self, digest: str, nbytes: int) -> None:
        """``nbytes`` more bytes of a layer arrived (negative when a download restarts)."""

    def layer_finished(self, digest: str) -> None:
        """A layer is verified and in the cache."""

    def layer_cached(self, digest: str, size: int) -> None:
        """A layer was already in the cache: nothing moved."""

    def building(self, fmt: str) -> None:
        """All blobs are here; unpacking and building the root filesystem image."""

    def done(self, image: Image) -> None:
        """The image is ready."""

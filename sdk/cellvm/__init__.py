"""cellvm: run untrusted code and notebooks in hardware-isolated microVMs."""

from cellvm.errors import (
    AuthenticationError,
    BootFailed,
    CellvmError,
    DeadlineExceeded,
    DigestMismatch,
    GuestCrashed,
    GuestError,
    HypervisorError,
    ImageError,
    ImageNotFound,
    InvalidReference,
    MachineClosed,
    RegistryUnavailable,
    SnapshotCorrupt,
    SnapshotError,
    SnapshotIncompatible,
)

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "BootFailed",
    "CellvmError",
    "DeadlineExceeded",
    "DigestMismatch",
    "GuestCrashed",
    "GuestError",
    "HypervisorError",
    "ImageError",
    "ImageNotFound",
    "InvalidReference",
    "MachineClosed",
    "RegistryUnavailable",
    "SnapshotCorrupt",
    "SnapshotError",
    "SnapshotIncompatible",
]

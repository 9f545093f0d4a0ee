"""Every error cellvm raises, in one tree under :class:`CellvmError`.

Each class is named for its cause, so callers catch exactly what they can
handle:

    CellvmError
    ├── HypervisorError         /dev/kvm missing, unusable, or an ioctl failed
    ├── GuestError              the guest did something that stopped the machine
    │   ├── GuestCrashed        triple fault, emulation failure, unexpected exit
    │   ├── BootFailed          the guest never reached its ready point
    │   └── SandboxCrashed      a sandbox's VM stopped while in use
    ├── DeadlineExceeded        a vCPU or the guest missed a deadline
    │   └── ExecTimeout         a command ran past its timeout and was killed
    ├── MachineClosed           the machine was used after close()
    ├── GuestNotBuilt           no guest kernel or agent on this machine (./dev setup)
    ├── SnapshotError
    │   ├── SnapshotCorrupt     truncated, bad checksum, unreadable
    │   └── SnapshotIncompatible  other format version, backend or VM shape
    └── ImageError
        ├── InvalidReference    "node:24" style reference that does not parse
        ├── ImageNotFound       the registry has no such repository or tag
        ├── RegistryUnavailable connection refused, timeouts, 5xx after retries
        ├── AuthenticationError the registry refused our credentials
        ├── DigestMismatch      downloaded content does not match its digest
        └── UnsafeLayer         a layer entry would write outside the root filesystem
    └── AgentError              the guest agent refused or failed a request
        ├── ProtocolError       a malformed frame or message (either side)
        ├── AgentDisconnected   the channel to the agent closed
        ├── CommandNotFound     the program to run does not exist (or is not in PATH)
        ├── ExecFailed          the command could not start: permission, cwd, user
        └── GuestFileError      a file operation in the guest failed
            └── GuestFileNotFound  the path does not exist

Errors from the C++ core carry what is known when they happen: the exit
reason, the vCPU, its registers and the tail of the guest console.
"""

from __future__ import annotations

from typing import Any


class CellvmError(Exception):
    """Base class of every error cellvm raises."""


class HypervisorError(CellvmError):
    """/dev/kvm is missing or unusable, or a hypervisor call failed."""


class GuestError(CellvmError):
    """The guest stopped the machine in a way it should not have.

    Attributes:
        reason: short machine-readable cause ("shutdown", "internal-error", ...).
        vcpu: index of the vCPU that stopped, or None.
        registers: that vCPU's general registers when known (name -> value).
        console: the tail of the guest's console output.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        vcpu: int | None = None,
        registers: dict[str, int] | None = None,
        console: str = "",
        **details: Any,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.vcpu = vcpu
        self.registers = registers or {}
        self.console = console
        self.details = details

    def __str__(self) -> str:
        text = super().__str__()
        if self.console:
            tail = "\n".join(self.console.rstrip("\n").splitlines()[-15:])
            text += f"\n--- guest console (tail) ---\n{tail}"
        return text


class GuestCrashed(GuestError):
    """Triple fault, emulation failure or another exit the VMM cannot continue from."""


class BootFailed(GuestError):
    """The guest did not reach its ready point (panic, bad init, missed deadline)."""


class DeadlineExceeded(CellvmError):
    """An operation did not finish in time: a vCPU that never reached a barrier,
    or a guest that did not finish. ``vcpu`` names the vCPU when one is to blame."""

    def __init__(self, message: str, *, vcpu: int | None = None, console: str = "") -> None:
        super().__init__(message)
        self.vcpu = vcpu
        self.console = console


class MachineClosed(CellvmError):
    """The machine was used after it was closed."""


class SnapshotError(CellvmError):
    """A snapshot cannot be written or restored."""


class SnapshotCorrupt(SnapshotError):
    """The snapshot is truncated, fails its checksums or cannot be parsed."""


class SnapshotIncompatible(SnapshotError):
    """The snapshot is intact but was taken by another format version, backend or VM shape."""


class ImageError(CellvmError):
    """An OCI image cannot be resolved, fetched or unpacked."""


class InvalidReference(ImageError):
    """The image reference does not parse (e.g. upper-case repository, bad digest)."""


class ImageNotFound(ImageError):
    """The registry has no such repository, tag or digest."""


class RegistryUnavailable(ImageError):
    """The registry could not be reached or kept failing after retries."""


class AuthenticationError(ImageError):
    """The registry refused the credentials (or there were none and it wants some)."""


class DigestMismatch(ImageError):
    """Downloaded content does not hash to the digest that named it."""


class UnsafeLayer(ImageError):
    """A layer entry would escape the root filesystem (``..``, an absolute path,
    or a write through a symlink that leads out); nothing outside was touched."""


class ExecTimeout(DeadlineExceeded):
    """A command ran past its timeout; the agent killed its process group.
    ``result`` holds what it wrote until then (an ``ExecResult``)."""

    def __init__(self, message: str, *, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


class AgentError(CellvmError):
    """The guest agent refused or failed a request.

    Attributes:
        code: the agent's error code name ("permission", "not-found", ...).
        errno: the guest errno behind it, 0 if none.
    """

    def __init__(self, message: str, *, code: str = "", errno: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.errno = errno


class ProtocolError(AgentError):
    """A frame or message was malformed or unexpected (sent by us or by the agent)."""


class AgentDisconnected(AgentError):
    """The channel to the agent closed (the VM stopped, or the agent process ended)."""


class CommandNotFound(AgentError):
    """The program to run does not exist, or is not in the command's PATH."""


class ExecFailed(AgentError):
    """The command could not be started: permission denied, a working directory
    that cannot be entered, an unknown user, or an unexecutable file."""


class GuestFileError(AgentError):
    """A file operation in the guest failed; ``code`` says why."""


class GuestFileNotFound(GuestFileError):
    """The path does not exist in the guest."""


class SandboxCrashed(GuestError):
    """The sandbox's VM stopped while it was in use (guest panic, agent
    crash, triple fault); ``console`` holds the tail of its console."""


class GuestNotBuilt(CellvmError):
    """The guest kernel or agent is not built on this machine (run ./dev setup)."""

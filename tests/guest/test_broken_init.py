"""A guest whose init cannot run must end quickly with a useful console tail,
never hang."""

from __future__ import annotations

import subprocess
import sys

from guestboot import REPO, boot


def test_broken_init_fails_with_console_tail(kvm, qemu, vmlinux, tmp_path):
    bad_init = tmp_path / "init"
    bad_init.write_bytes(b"this is not an executable\n")
    spec = tmp_path / "spec"
    spec.write_text(
        f"dir /dev 0755\nnod /dev/console 0600 c 5 1\nfile /init 0755 {bad_init}\n"
    )
    initrd = tmp_path / "broken.cpio.gz"
    subprocess.run(
        [sys.executable, str(REPO / "guest/init/mkcpio.py"), str(spec), str(initrd)], check=True
    )
    b = boot(qemu, vmlinux, initrd, timeout=60)
    assert b.result is None
    assert b.returncode is not None, f"guest hung instead of failing:\n{b.tail()}"
    assert "Kernel panic" in b.console and "No working init found" in b.console, b.tail()

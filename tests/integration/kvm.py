"""Whether KVM runs real guests on this host, asked without libvirt or hvagent.

The accelerator probe (``Virt.probe_accel``) decides from firmware alone; tests compare what it
decides with this answer instead of with what one machine happens to have. QEMU boots the tiny
image (SYSLINUX, then Linux) straight from the command line, on a throwaway snapshot of the disk,
and its serial console must reach the guest's own init ("tiny: booting Tiny"). A /dev/kvm that
is missing or does not open is a no at once; a KVM that cannot run the bootloader ("KVM internal
error", QEMU pauses the guest) is a no as soon as QEMU says so.
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
import time
from pathlib import Path

from tests.conftest import image

BOOTED = "tiny: booting Tiny"
BROKEN = "KVM internal error"


def boots(accel: str, timeout: float = 120.0) -> bool:
    """Whether the tiny image reaches its init under QEMU with ``-accel ACCEL`` (kvm, tcg)."""
    with tempfile.TemporaryDirectory() as tmp:
        console, errors = Path(tmp) / "console.log", Path(tmp) / "qemu.err"
        argv = ["qemu-system-x86_64", "-accel", accel, "-machine", "q35", "-m", "256", "-nodefaults",
                "-no-user-config", "-display", "none", "-serial", f"file:{console}",
                "-drive", f"file={image('tiny-1.0')},format=qcow2,if=virtio,snapshot=on"]
        with errors.open("wb") as err:
            qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env={
                **os.environ, "TMPDIR": tmp})  # the snapshot's overlay goes away with the directory
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and qemu.poll() is None:
                if console.exists() and BOOTED in console.read_text(errors="replace"):
                    return True
                if BROKEN in errors.read_text(errors="replace"):
                    return False
                time.sleep(0.5)
            return console.exists() and BOOTED in console.read_text(errors="replace")
        finally:
            qemu.kill()
            qemu.wait()


@functools.cache
def kvm_runs_real_guests() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError:
        return False
    return boots("kvm")

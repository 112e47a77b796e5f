"""A libvirtd of a test's own inside a network namespace the test creates (``lab/ns-libvirtd``, as
the lab runs one), and other namespaces beside it: made, and removed with all their domains, even
when the test fails."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, TEST_ROOT

NS_LIBVIRTD = ROOT / "lab" / "ns-libvirtd"


def run(*cmd: str | Path, check: bool = True, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if check:
        assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"
    return r


@dataclass(frozen=True)
class NsHost:
    ns: str  # the host's namespace, where libvirtd runs
    base: Path  # TEST_ROOT/<tag>: the test's files (0711: libvirt-qemu opens the guests' disks below it)
    uri: str

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("virsh", "-c", self.uri, *args, check=check)


@contextmanager
def ns_host(prefix: str, others: Sequence[str] = (), tools: Sequence[str] = ()) -> Iterator[NsHost]:
    """Namespaces ``<prefix><pid>`` (libvirtd inside) and ``<prefix><pid><o>`` for each of
    ``others``, loopback up in each."""
    for tool in ("ip", "unshare", "libvirtd", "virtlogd", *tools):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (make host installs it)")
    tag = f"{prefix}{os.getpid() % 100000}"
    names = [tag, *(tag + o for o in others)]
    base = TEST_ROOT / tag
    run_dir = Path("/run") / tag
    host = NsHost(tag, base, f"qemu:///system?socket={run_dir}/libvirt-sock")
    try:
        TEST_ROOT.mkdir(mode=0o711, exist_ok=True)
        base.mkdir(mode=0o711)
        for ns in names:
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run(NS_LIBVIRTD, "start", tag, base, run_dir, timeout=60)
        yield host
    finally:
        if (run_dir / "libvirtd.pid").exists():
            for name in run("virsh", "-q", "-c", host.uri, "list", "--all", "--name", check=False).stdout.split():
                host.virsh("destroy", name, check=False)
                host.virsh("undefine", "--nvram", name, check=False)
        run(NS_LIBVIRTD, "stop", run_dir, check=False)
        for ns in names:
            if Path(f"/run/netns/{ns}").exists():
                run("ip", "netns", "del", ns, check=False)
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)

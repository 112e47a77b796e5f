"""What the swapper and the canary both act with: the host's configuration, state, catalog,
libvirt, provisioner, accelerator and lock, and a clock tests can set."""

from __future__ import annotations

import time
from collections.abc import Callable

from agent.catalog import Catalog
from agent.config import Config
from agent.domxml import DomainType
from agent.provision import Provisioner
from agent.state import HostLock, State
from agent.virt import Virt


class HostParts:
    def __init__(self, cfg: Config, state: State, catalog: Catalog, virt: Virt, prov: Provisioner,
                 accel: Callable[[], DomainType], lock: HostLock,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.state = state
        self.catalog = catalog
        self.virt = virt
        self.prov = prov
        self._accel = accel
        self.lock = lock
        self._clock = clock

"""Service and host: ``/healthz`` for anyone (no token); ``/metrics`` (Prometheus) and ``/v1/host``
(facts, capacity, accelerator, the guest OS compatibility list) for admins only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from agent import __version__
from agent.api.common import Admin, DaemonDep
from agent.metrics import StateCollector

if TYPE_CHECKING:
    from agent.daemon import Daemon

router = APIRouter()


def metrics_registry(d: Daemon) -> CollectorRegistry:
    """What ``/metrics`` serves: the state's gauges and counters, collected at each scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(d.host))
    return registry


@router.get("/healthz", tags=["service"])
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics", tags=["service"], response_class=PlainTextResponse)
def metrics(_: Admin, request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/host", tags=["host"])
def host_facts(_: Admin, d: DaemonDep) -> dict[str, Any]:
    host = d.host()
    return {"facts": host.virt.host_facts(), "capacity": host.provisioner.capacity(),
            "accelerator": host.accelerator().value, "compat": host.catalog.compat(), "version": __version__}

"""Rollouts, for admins only: list and read them, start one for an image family, pause, resume or
abort it."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from agent.api.common import Admin, DaemonDep, rollout_view
from agent.errors import NotFound
from agent.rollout import parse_family, parse_max_unavailable

FAMILY = r"^[a-z][a-z0-9-]{0,62}-[0-9]{1,6}(?:\.\*)?$"

router = APIRouter(tags=["rollouts"])


class RolloutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    family: StrictStr = Field(pattern=FAMILY, description="tiny-1 or tiny-1.*")
    max_unavailable: StrictStr | None = Field(None, max_length=8, description="a count (3) or a percentage (25%)")
    canary: StrictBool | None = Field(None, description="boot the version on a throwaway VM before the first "
                                      "batch; default: the host's configuration")
    now: StrictBool = Field(False, description="swap outside the VMs' maintenance windows too")


@router.get("/v1/rollouts")
def rollouts_list(_: Admin, d: DaemonDep,
                  all_: Annotated[bool, Query(alias="all")] = False) -> list[dict[str, Any]]:
    host = d.host()
    return [rollout_view(host, ro) for ro in host.state.rollouts(active_only=not all_)]


@router.get("/v1/rollouts/{rid}")
def rollout_get(_: Admin, d: DaemonDep, rid: Annotated[int, PathParam(ge=1, le=1 << 31)]) -> dict[str, Any]:
    host = d.host()
    ro = host.state.rollout(rid)
    if ro is None:
        raise NotFound(f"rollout {rid}: no such rollout")
    return rollout_view(host, ro)


@router.post("/v1/rollouts", status_code=202)
def rollout_start(_: Admin, d: DaemonDep, body: RolloutRequest) -> dict[str, Any]:
    name, major = parse_family(body.family)
    if body.max_unavailable is not None:
        parse_max_unavailable(body.max_unavailable, "max_unavailable")
    with d.locked() as host:
        ro = host.rollouts.start(name, major, body.max_unavailable, body.canary, body.now)
    d.poke()
    return {"rollout": rollout_view(host, ro) if ro else None}


@router.post("/v1/rollouts/{family}/{action}")
def rollout_action(_: Admin, d: DaemonDep, family: Annotated[str, PathParam(pattern=FAMILY)],
                   action: Annotated[str, PathParam(pattern=r"^(pause|resume|abort)$")]) -> dict[str, Any]:
    host = d.host()
    ro = getattr(host.rollouts, action)(family)
    d.poke()
    return {"rollout": rollout_view(host, host.state.rollout(ro.id) or ro)}

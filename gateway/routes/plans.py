"""Admin: the contingency plans (flashsale/plans.py) and the dependency map (docs/plans.md)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from aiohttp import web
from msgspec import UNSET, Meta, UnsetType

from flashsale import plans
from flashsale.auth import Principal
from flashsale.errors import ValidationFailed
from gateway import appkeys
from gateway.dependencies import NONE, STRONG, WEAK, dependency_map
from gateway.flash_runtime import FLASH
from gateway.http import ok
from gateway.plans_runtime import SWITCHES
from gateway.routing import ROUTE_TABLE, Route
from gateway.shapes import Answer, Body, PathParams, PathText, one_of, or_none, read_body, read_path


class PlanPath(PathParams):
    what = "plan"
    name: PathText


class Switch(Body):
    mode: Annotated[str, one_of(plans.MODES)]
    # the plan's name again: a flip is a decision, not a stray click or a replayed request
    confirm: Annotated[str, Meta(max_length=64)]
    reason: Annotated[str, Meta(max_length=500)] | UnsetType = UNSET
    options: Annotated[dict[str, bool | Annotated[int, Meta(ge=1)]], Meta(max_length=8)] | None = (
        None
    )


Mode = Annotated[str, one_of(plans.MODES)]


class PlanState(Answer):
    """A plan's state: who moved it last, when (Unix seconds; 0: never) and why; ``auto``
    when its own trigger did."""

    name: str
    mode: Mode
    auto: bool
    by: str
    at: float
    reason: str
    on: bool


class Plan(PlanState):
    """A plan as the runbook states it, with its state (``options``: the names of the
    options it takes)."""

    does: str
    trigger: str
    who: str
    closing: str
    arms_itself: bool
    options: list[str]


class PlanMove(Answer):
    """A line of the operation log (``at``: Unix seconds)."""

    plan: str
    from_: Mode = msgspec.field(name="from")
    to: Mode
    by: str
    reason: str
    auto: bool
    at: float


class PlanBoard(Answer):
    plans: list[Plan]
    log: list[PlanMove]  # newest first


class PlanSwitched(PlanState):
    options: dict[str, Any]  # the options it was switched with
    moved: bool  # false: the plan was already so


class StoreNeed(Answer):
    """What a route needs of a store (strong, weak or none), what it answers when the store
    is gone, and the plan that helps then."""

    need: Annotated[str, one_of((STRONG, WEAK, NONE))]
    when_gone: str
    plan: str | UnsetType = UNSET


class RouteNeeds(Answer):
    method: str
    path: str
    tag: str
    auth: str | None
    needs: dict[str, StoreNeed]  # by store: postgres, redis, kafka


class DependencyMap(Answer):
    stores: dict[str, str]  # each store and what it holds
    routes: list[RouteNeeds]


async def list_plans(request: web.Request, principal: Principal) -> web.Response:
    redis = request.app[appkeys.REDIS]
    switches = request.app[SWITCHES]
    await switches.refresh(redis)
    return ok({"plans": switches.public(), "log": await plans.operation_log(redis)})


async def switch_plan(request: web.Request, principal: Principal) -> web.Response:
    name = read_path(request, PlanPath).name
    plans.plan_named(name)
    body = await read_body(request, Switch)
    if body.confirm != name:
        raise ValidationFailed(fields={"confirm": f"must repeat the plan's name ({name})"})
    redis = request.app[appkeys.REDIS]
    by, reason, options = (
        f"admin:{principal.user_id}",
        or_none(body.reason) or "",
        body.options,
    )
    if name == plans.QUEUE_SALE:
        sale_id = (options or {}).get("sale_id")
        if not isinstance(sale_id, int) or isinstance(sale_id, bool) or body.mode == plans.ARMED:
            raise ValidationFailed(fields={"options": "queue-sale: on|off with {sale_id: N}"})
        rt = request.app[FLASH]
        moved = await plans.queue_sale(
            request.app[appkeys.DB],
            rt.redis,
            rt.scripts,
            sale_id,
            queued=body.mode == plans.ON,
            by=by,
            reason=reason,
        )
        await rt.cache.refresh()
    else:
        moved = await plans.switch(redis, name, body.mode, by=by, reason=reason, options=options)
    switches = request.app[SWITCHES]
    await switches.refresh(redis)
    state = switches.states[name].public()
    return ok(state | {"moved": moved}, message="switched" if moved else "unchanged")


async def dependencies(request: web.Request, principal: Principal) -> web.Response:
    routes: list[Route] = request.app[ROUTE_TABLE]
    return ok(dependency_map(routes))


ROUTES = [
    Route(
        "GET",
        "/api/v1/admin/plans",
        list_plans,
        "Every contingency plan (what it does, trigger, owner, closing, state) and the "
        "operation log of their switches",
        auth="admin",
        tag="plans",
        answer=PlanBoard,
    ),
    Route(
        "PUT",
        "/api/v1/admin/plans/{name}",
        switch_plan,
        "Switch a plan off, on, or armed (its trigger may switch it on); in force on every "
        "worker within a second",
        auth="admin",
        body=Switch,
        params=PlanPath,
        tag="plans",
        answer=PlanSwitched,
    ),
    Route(
        "GET",
        "/api/v1/admin/dependencies",
        dependencies,
        "The dependency map: for every route, the stores it needs strongly or weakly and "
        "what it answers when one is gone",
        auth="admin",
        tag="plans",
        answer=DependencyMap,
    ),
]

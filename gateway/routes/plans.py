"""Admin: the contingency plans (flashsale/plans.py) and the dependency map (docs/plans.md)."""

from __future__ import annotations

from typing import Annotated, Final

from aiohttp import web
from msgspec import UNSET, Meta, UnsetType

from flashsale import plans
from flashsale.auth import Principal
from flashsale.errors import NotFound, ValidationFailed
from gateway import appkeys
from gateway.dependencies import dependency_map
from gateway.flash_runtime import FLASH
from gateway.http import ok
from gateway.plans_runtime import SWITCHES
from gateway.routing import ROUTE_TABLE, Route
from gateway.shapes import Body, one_of, or_none, read_body
from gateway.validation import F, path_text

PLAN_NAME: Final = F(str, min_len=1, max_len=64)


class Switch(Body):
    mode: Annotated[str, one_of(plans.MODES)]
    # the plan's name again: a flip is a decision, not a stray click or a replayed request
    confirm: Annotated[str, Meta(max_length=64)]
    reason: Annotated[str, Meta(max_length=500)] | UnsetType = UNSET
    options: Annotated[dict[str, bool | Annotated[int, Meta(ge=1)]], Meta(max_length=8)] | None = (
        None
    )


async def list_plans(request: web.Request, principal: Principal) -> web.Response:
    redis = request.app[appkeys.REDIS]
    switches = request.app[SWITCHES]
    await switches.refresh(redis)
    return ok({"plans": switches.public(), "log": await plans.operation_log(redis)})


async def switch_plan(request: web.Request, principal: Principal) -> web.Response:
    name = path_text(request.match_info["name"], "plan", spec=PLAN_NAME)
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
    ),
    Route(
        "PUT",
        "/api/v1/admin/plans/{name}",
        switch_plan,
        "Switch a plan off, on, or armed (its trigger may switch it on); in force on every "
        "worker within a second",
        auth="admin",
        body=Switch,
        params={"name": PLAN_NAME},
        responses=(NotFound, ValidationFailed),
        tag="plans",
    ),
    Route(
        "GET",
        "/api/v1/admin/dependencies",
        dependencies,
        "The dependency map: for every route, the stores it needs strongly or weakly and "
        "what it answers when one is gone",
        auth="admin",
        tag="plans",
    ),
]

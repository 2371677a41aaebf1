"""Admin: the contingency plans (flashsale/plans.py) and the dependency map (docs/plans.md)."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from flashsale import plans
from flashsale.auth import Principal
from flashsale.errors import NotFound, ValidationFailed
from gateway import appkeys
from gateway.dependencies import dependency_map
from gateway.flash_runtime import FLASH
from gateway.http import ok, read_json
from gateway.plans_runtime import SWITCHES
from gateway.routing import ROUTE_TABLE, Route
from gateway.validation import F, path_text, validate

PLAN_NAME: Final = F(str, min_len=1, max_len=64)
SWITCH: Final = {
    "mode": F(str, choices=plans.MODES),
    # the plan's name again: a flip is a decision, not a stray click or a replayed request
    "confirm": F(str, max_len=64),
    "reason": F(str, required=False, max_len=500),
    "options": F(dict, required=False, nullable=True, max_len=8, values=(F(bool), F(int, min=1))),
}


async def list_plans(request: web.Request, principal: Principal) -> web.Response:
    redis = request.app[appkeys.REDIS]
    switches = request.app[SWITCHES]
    await switches.refresh(redis)
    return ok({"plans": switches.public(), "log": await plans.operation_log(redis)})


async def switch_plan(request: web.Request, principal: Principal) -> web.Response:
    name = path_text(request.match_info["name"], "plan", spec=PLAN_NAME)
    plans.plan_named(name)
    body = validate(await read_json(request), SWITCH)
    if body["confirm"] != name:
        raise ValidationFailed(fields={"confirm": f"must repeat the plan's name ({name})"})
    redis = request.app[appkeys.REDIS]
    by, reason, options = (
        f"admin:{principal.user_id}",
        body.get("reason") or "",
        body.get("options"),
    )
    if name == plans.QUEUE_SALE:
        sale_id = (options or {}).get("sale_id")
        if not isinstance(sale_id, int) or isinstance(sale_id, bool) or body["mode"] == plans.ARMED:
            raise ValidationFailed(fields={"options": "queue-sale: on|off with {sale_id: N}"})
        rt = request.app[FLASH]
        moved = await plans.queue_sale(
            request.app[appkeys.DB],
            rt.redis,
            rt.scripts,
            sale_id,
            queued=body["mode"] == plans.ON,
            by=by,
            reason=reason,
        )
        await rt.cache.refresh()
    else:
        moved = await plans.switch(redis, name, body["mode"], by=by, reason=reason, options=options)
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
        body=SWITCH,
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

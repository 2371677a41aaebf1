"""HTTP handlers, grouped by area; each module exposes ``ROUTES``.

``extra_routes`` and ``extra_contexts`` collect the areas beyond auth and ops
(flash sales, storefront) so that ``create_app`` stays one short list.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from aiohttp import web

from flashsale.settings import Settings
from gateway.routing import Route


def extra_routes(settings: Settings | None = None) -> list[Route]:
    from gateway.routes import (
        addresses,
        backoffice,
        cart,
        catalog,
        dashboard,
        flashsales,
        inventory,
        marketing,
        orders,
        payments,
        plans,
        presale,
        waitingroom,
    )

    return [
        *flashsales.ROUTES,
        *waitingroom.ROUTES,
        *catalog.ROUTES,
        *presale.ROUTES,
        *inventory.ROUTES,
        *orders.ROUTES,
        *payments.ROUTES,
        *payments.provider_routes(settings),
        *cart.ROUTES,
        *marketing.ROUTES,
        *dashboard.ROUTES,
        *addresses.ROUTES,
        *backoffice.ROUTES,
        *plans.ROUTES,
    ]


def extra_contexts() -> list[Callable[[web.Application], AsyncIterator[None]]]:
    from gateway.flash_runtime import flash_ctx
    from gateway.plans_runtime import plans_ctx
    from gateway.routes.dashboard import hub_ctx
    from gateway.waitingroom_runtime import waiting_room_ctx

    return [flash_ctx, waiting_room_ctx, hub_ctx, plans_ctx]

"""HTTP handlers, grouped by area; each module exposes ``ROUTES``.

``extra_routes`` and ``extra_contexts`` collect the areas beyond auth and ops
(flash sales, storefront) so that ``create_app`` stays one short list.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from aiohttp import web

from gateway.routing import Route


def extra_routes() -> list[Route]:
    from gateway.routes import inventory, orders, payments

    return [*inventory.ROUTES, *orders.ROUTES, *payments.ROUTES]


def extra_contexts() -> list[Callable[[web.Application], AsyncIterator[None]]]:
    from gateway.services.sweepers_store import store_sweeper_ctx

    return [store_sweeper_ctx]

"""HTTP handlers, grouped by area; each module exposes ``ROUTES``.

``extra_routes`` and ``extra_contexts`` collect the areas beyond auth and ops
(flash sales, storefront) so that ``create_app`` stays one short list.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from aiohttp import web

from gateway.routing import Route


def extra_routes() -> list[Route]:
    from gateway.routes import cart, marketing

    return [*cart.ROUTES, *marketing.ROUTES]


def extra_contexts() -> list[Callable[[web.Application], AsyncIterator[None]]]:
    return []

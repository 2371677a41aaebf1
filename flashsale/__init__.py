"""The flash-sale core: settings, stores, scripts, the event contract, errors and the domain.

Nothing here knows about HTTP (``gateway/``) or the Kafka consumers (``consumers/``); both
import from here, never the other way round. The map:

- ``stores/``: connections, keys, scripts, metrics, ids (no domain import);
- ``flash/``: flash sales (join, lifecycle, buckets, recount); ``waitingroom/``: queued
  sales; ``orders/``: regular orders; ``dashboard/``: the sale dashboard's figures;
- ``settings``, ``errors``: every ``FLASHSALE_*`` setting, every client-visible error;
  ``timing``: the fixed periods, timeouts, backoffs and lifetimes, each with its reason;
- ``auth`` (tokens, roles), ``sessions`` (token revocation), ``users``, ``addresses``;
- the storefront: ``catalog``, ``inventory``, ``cart``, ``promotions``, ``coupons``,
  ``payments``, ``presale``; ``plans`` (sale-day contingency switches); ``demo`` (the
  demo data ``flashsale up`` loads); ``paging`` (one page of a list, as every list answers).
"""

"""Regular orders (and the state changes every order shares), one job per module:
``create`` (creation in undoable steps), ``states`` (the state machine and the timeout
close), ``views`` (what a shopper reads), ``model`` (statuses, actors, the order row and
its log), ``backoffice`` (merchant and admin lists) and ``returns`` (returns and refunds
after shipping; import it as ``flashsale.orders.returns``: it sits above payments). The
names other packages use are importable from here."""

from __future__ import annotations

from flashsale.orders.create import MAX_LINE_QUANTITY, OrderLineRequest, create_order
from flashsale.orders.model import (
    REFUNDABLE,
    SANDBOX_PROVIDER,
    SQL_ORDER_FOR_UPDATE,
    STATUSES,
    SYSTEM,
    Actor,
    invalid_transition,
    new_payment_id,
    version_conflict,
    write_log,
)
from flashsale.orders.states import (
    cancel_order,
    cancel_paid,
    close_expired_orders,
    confirm_order,
    deliver_order,
    mark_paid,
    ship_order,
)
from flashsale.orders.views import get_order, list_orders, order_detail, order_logs

__all__ = [
    "MAX_LINE_QUANTITY",
    "REFUNDABLE",
    "SANDBOX_PROVIDER",
    "SQL_ORDER_FOR_UPDATE",
    "STATUSES",
    "SYSTEM",
    "Actor",
    "OrderLineRequest",
    "cancel_order",
    "cancel_paid",
    "close_expired_orders",
    "confirm_order",
    "create_order",
    "deliver_order",
    "get_order",
    "invalid_transition",
    "list_orders",
    "mark_paid",
    "new_payment_id",
    "order_detail",
    "order_logs",
    "ship_order",
    "version_conflict",
    "write_log",
]

-- Money that must add up (issue 20): refunds the provider makes on its own, a return's
-- refund tied to the lines that come back, and what reconcile checks.

-- A payment verified after its order was cancelled, expired or paid by another payment is
-- given back at once: the pay order ends 'refunded' (the one-success index is about the
-- payment that paid the order, and a late one never did). Such a refund is the system's:
-- no user asked for it.
ALTER TABLE pay_orders DROP CONSTRAINT pay_orders_status_check;
ALTER TABLE pay_orders ADD CONSTRAINT pay_orders_status_check
    CHECK (status IN ('pending', 'success', 'failed', 'closed', 'refunded'));
ALTER TABLE refunds ALTER COLUMN requested_by DROP NOT NULL;
CREATE INDEX refunds_pay_order_idx ON refunds (pay_order_id);

-- What the lines of a return are worth: quantity × unit price of each returned SKU, less the
-- order's discount in proportion (rounded down, so the shares of several returns never add
-- up to more than the goods paid). Shipping is not in it. One definition for the request
-- (the default amount) and for reconcile (which recomputes it). A SKU on several lines of
-- one order is priced at the average of those lines, rounded down.
CREATE FUNCTION return_share_cents(p_order_id TEXT, p_items JSONB) RETURNS BIGINT
LANGUAGE sql STABLE AS $$
    WITH unit AS (
        SELECT sku_id, sum(quantity * price_cents) / sum(quantity) AS price_cents
        FROM order_items WHERE order_id = p_order_id GROUP BY sku_id
    ), lines AS (
        SELECT coalesce(sum((i ->> 'quantity')::bigint * u.price_cents), 0) AS value
        FROM jsonb_array_elements(p_items) i
        JOIN unit u ON u.sku_id = (i ->> 'sku_id')::bigint
    )
    SELECT CASE WHEN o.total_cents > 0
                THEN lines.value * (o.total_cents - o.discount_cents) / o.total_cents
                ELSE 0 END
    FROM orders o, lines WHERE o.id = p_order_id
$$;

-- approved_cents: the amount a merchant or admin approved explicitly, above what the
-- request's lines are worth; NULL when the approval took the default.
ALTER TABLE order_returns ADD COLUMN approved_cents BIGINT CHECK (approved_cents > 0);

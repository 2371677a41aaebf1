-- Cancelling a paid presale order refunds it in full in the same transaction: a refund,
-- like a pay order, belongs to exactly one order, regular/flash (order_id) or presale
-- (presale_order_id).
ALTER TABLE refunds
    ALTER COLUMN order_id DROP NOT NULL,
    ADD COLUMN presale_order_id TEXT REFERENCES presale_orders (id),
    ADD CONSTRAINT refunds_one_order_chk CHECK (num_nonnulls(order_id, presale_order_id) = 1);
CREATE INDEX refunds_presale_order_idx ON refunds (presale_order_id)
    WHERE presale_order_id IS NOT NULL;

-- What went back to the buyer of a presale order (a paid order is refunded in full when it
-- is cancelled).
ALTER TABLE presale_orders
    ADD COLUMN refunded_cents BIGINT NOT NULL DEFAULT 0 CHECK (refunded_cents >= 0),
    ADD CONSTRAINT presale_orders_refund_le_total CHECK (refunded_cents <= total_cents);

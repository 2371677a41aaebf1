-- Presale orders are paid through the payment path too: a pay order belongs to exactly one
-- order, either a regular/flash order (order_id) or a presale order (presale_order_id), each
-- a real foreign key.
ALTER TABLE pay_orders
    ALTER COLUMN order_id DROP NOT NULL,
    ADD COLUMN presale_order_id TEXT REFERENCES presale_orders (id),
    ADD CONSTRAINT pay_orders_one_order_chk CHECK (num_nonnulls(order_id, presale_order_id) = 1);
CREATE INDEX pay_orders_presale_order_idx ON pay_orders (presale_order_id)
    WHERE presale_order_id IS NOT NULL;
CREATE UNIQUE INDEX pay_orders_presale_one_pending_uq ON pay_orders (presale_order_id)
    WHERE status = 'pending';
CREATE UNIQUE INDEX pay_orders_presale_one_success_uq ON pay_orders (presale_order_id)
    WHERE status = 'success';

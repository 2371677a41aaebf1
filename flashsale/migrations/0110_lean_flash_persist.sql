-- The flash consumer's batch write, leaner (issue 23, priced by `python -m
-- loadtests.price_drain`): every row it writes pays for each index and each speculative
-- insertion of its table in CPU and WAL.

-- No query reads the ledger by SKU (it is an audit trail, read by order id through
-- inventory_ledger_order_reason_uq); the index cost 64 B of WAL per flash order.
DROP INDEX inventory_ledger_sku_idx;

-- The same rows as before, without INSERT ... ON CONFLICT: its speculative insertion
-- writes a second WAL record (and takes a second pass) per merchant row. A statement
-- adds to the rows already there, then inserts the others; items of one order are
-- written by the transaction that creates the order, so no two statements race for a
-- new (merchant, order) row.
CREATE OR REPLACE FUNCTION merchant_orders_from_items() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH added AS (
        SELECT p.merchant_id, o.id AS order_id, o.created_at, o.status, o.user_id,
               sum(n.quantity) AS units, sum(n.quantity * n.price_cents) AS amount_cents
        FROM new_items n
        JOIN products p ON p.id = n.product_id
        JOIN orders o ON o.id = n.order_id
        GROUP BY p.merchant_id, o.id, o.created_at, o.status, o.user_id
    ), grown AS (
        UPDATE merchant_orders mo
        SET units = mo.units + a.units, amount_cents = mo.amount_cents + a.amount_cents
        FROM added a
        WHERE mo.merchant_id = a.merchant_id AND mo.order_id = a.order_id
        RETURNING mo.merchant_id, mo.order_id
    )
    INSERT INTO merchant_orders
        (merchant_id, order_id, created_at, status, user_id, units, amount_cents)
    SELECT a.merchant_id, a.order_id, a.created_at, a.status, a.user_id, a.units,
           a.amount_cents
    FROM added a
    WHERE NOT EXISTS (
        SELECT 1 FROM grown g WHERE g.merchant_id = a.merchant_id AND g.order_id = a.order_id);
    RETURN NULL;
END $$;

-- A flash sale's orders by status, kept exact in the transactions that write the orders
-- (issue 23): the dashboard's snapshot reads a few counter rows each second instead of
-- counting the sale's orders (82 ms over 360k orders, every second, beside the drain).
--
-- One row per (sale, status, slot): `orders` orders of the sale in that status, `expired`
-- those of them cancelled by the payment deadline (cancel_reason 'payment_timeout'). A
-- writer adds to one slot, so only the sum over a sale's slots means anything: a slot's
-- figure may be negative (an order counted in slot 3 when written, paid in slot 9).
--
-- The slot is the writing transaction's id modulo 32. The row a transaction adds to stays
-- locked until it commits, and the consumers drain one hot sale side by side: on a single
-- row each would wait at its first statement for the others' whole transactions, where
-- today they take turns only for their last step (the sale row). With the transaction id,
-- two concurrent writers meet on one row 1 time in 32, and not again in their next
-- transactions; a backend's pid would make the same pair meet on every batch. Every
-- statement of one transaction uses one slot, so it holds as few rows as possible. A
-- reader sums at most 32 rows per status.
CREATE TABLE flash_sale_order_counts (
    flash_sale_id BIGINT   NOT NULL REFERENCES flash_sales (id) ON DELETE CASCADE,
    status        TEXT     NOT NULL,
    slot          SMALLINT NOT NULL,
    orders        BIGINT   NOT NULL DEFAULT 0,
    expired       BIGINT   NOT NULL DEFAULT 0,
    PRIMARY KEY (flash_sale_id, status, slot)
) WITH (fillfactor = 50);  -- room on the page for HOT updates: no index entry per update

-- Statement-level with transition tables: the consumer writes a batch of orders in one
-- COPY, and one grouped upsert per statement costs far less than a call per row. A
-- statement upserts its rows in key order (a batch of several sales locks them in one
-- order); two transactions that meet on a slot may still cross over two statements, as on
-- the sale rows, and the deadlock is retried as those are.
-- An UPDATE adds each new row and takes away each old one: a row whose status and
-- cancel_reason did not change nets to nothing, and a statement that changed none (most
-- order updates: units returned, refunds, the address, a cancel's second write) writes
-- nothing and locks nothing.
CREATE FUNCTION flash_sale_order_counts_track() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO flash_sale_order_counts AS c (flash_sale_id, status, slot, orders, expired)
        SELECT flash_sale_id, status, txid_current() % 32, count(*),
               count(*) FILTER (WHERE cancel_reason = 'payment_timeout')
        FROM new_orders WHERE flash_sale_id IS NOT NULL
        GROUP BY flash_sale_id, status ORDER BY flash_sale_id, status
        ON CONFLICT (flash_sale_id, status, slot) DO UPDATE
            SET orders = c.orders + excluded.orders, expired = c.expired + excluded.expired;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO flash_sale_order_counts AS c (flash_sale_id, status, slot, orders, expired)
        SELECT flash_sale_id, status, txid_current() % 32, -count(*),
               -count(*) FILTER (WHERE cancel_reason = 'payment_timeout')
        FROM old_orders WHERE flash_sale_id IS NOT NULL
        GROUP BY flash_sale_id, status ORDER BY flash_sale_id, status
        ON CONFLICT (flash_sale_id, status, slot) DO UPDATE
            SET orders = c.orders + excluded.orders, expired = c.expired + excluded.expired;
    ELSE
        INSERT INTO flash_sale_order_counts AS c (flash_sale_id, status, slot, orders, expired)
        SELECT flash_sale_id, status, txid_current() % 32, sum(n), sum(e)
        FROM (SELECT flash_sale_id, status, 1 AS n,
                     (cancel_reason IS NOT DISTINCT FROM 'payment_timeout')::int AS e
              FROM new_orders WHERE flash_sale_id IS NOT NULL
              UNION ALL
              SELECT flash_sale_id, status, -1,
                     -(cancel_reason IS NOT DISTINCT FROM 'payment_timeout')::int
              FROM old_orders WHERE flash_sale_id IS NOT NULL) d
        GROUP BY flash_sale_id, status HAVING sum(n) <> 0 OR sum(e) <> 0
        ORDER BY flash_sale_id, status
        ON CONFLICT (flash_sale_id, status, slot) DO UPDATE
            SET orders = c.orders + excluded.orders, expired = c.expired + excluded.expired;
    END IF;
    RETURN NULL;
END $$;
-- (A trigger with transition tables serves one event.) TRUNCATE fires none of them: the
-- service never truncates orders.
CREATE TRIGGER orders_flash_counts_insert
    AFTER INSERT ON orders REFERENCING NEW TABLE AS new_orders
    FOR EACH STATEMENT EXECUTE FUNCTION flash_sale_order_counts_track();
CREATE TRIGGER orders_flash_counts_update
    AFTER UPDATE ON orders REFERENCING OLD TABLE AS old_orders NEW TABLE AS new_orders
    FOR EACH STATEMENT EXECUTE FUNCTION flash_sale_order_counts_track();
CREATE TRIGGER orders_flash_counts_delete
    AFTER DELETE ON orders REFERENCING OLD TABLE AS old_orders
    FOR EACH STATEMENT EXECUTE FUNCTION flash_sale_order_counts_track();

-- Orders written before this migration (the triggers' lock on orders holds writers off
-- until it commits).
INSERT INTO flash_sale_order_counts (flash_sale_id, status, slot, orders, expired)
SELECT flash_sale_id, status, 0, count(*),
       count(*) FILTER (WHERE cancel_reason = 'payment_timeout')
FROM orders WHERE flash_sale_id IS NOT NULL
GROUP BY flash_sale_id, status;

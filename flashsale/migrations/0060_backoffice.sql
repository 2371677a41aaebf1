-- Back office and fulfilment (issue 12): the address book, the merchant's view of orders,
-- returns, and the indexes the merchant and admin lists answer from.

-- The address book: at most one default per user. An order never points at an entry; it
-- keeps a snapshot (orders.shipping_address), so editing or deleting an entry changes no order.
CREATE TABLE addresses (
    id         BIGSERIAL PRIMARY KEY,
    user_id    BIGINT      NOT NULL REFERENCES users (id),
    name       TEXT        NOT NULL,
    phone      TEXT        NOT NULL,
    region     TEXT        NOT NULL,
    city       TEXT        NOT NULL,
    detail     TEXT        NOT NULL,
    postcode   TEXT,
    is_default BOOLEAN     NOT NULL DEFAULT false,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX addresses_user_idx ON addresses (user_id, id);
CREATE UNIQUE INDEX addresses_one_default_uq ON addresses (user_id) WHERE is_default;

-- One row per (merchant, order) for every order holding a product of that merchant: the
-- merchant's list pages through (merchant_id, created_at) and (merchant_id, status,
-- created_at) instead of sorting every order of the shop. Triggers keep it in step with
-- order_items and orders.status whichever path writes them (checkout, the flash consumer,
-- the state machine, sweepers), so no writer has to remember it.
CREATE TABLE merchant_orders (
    merchant_id  BIGINT      NOT NULL REFERENCES users (id),
    -- (orders are never deleted by the service; the cascade keeps a cleanup one statement)
    order_id     TEXT        NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    created_at   TIMESTAMPTZ NOT NULL,
    status       TEXT        NOT NULL,
    user_id      BIGINT      NOT NULL,
    units        INTEGER     NOT NULL DEFAULT 0,
    amount_cents BIGINT      NOT NULL DEFAULT 0,
    PRIMARY KEY (merchant_id, order_id)
);
CREATE INDEX merchant_orders_created_idx ON merchant_orders (merchant_id, created_at, order_id);
CREATE INDEX merchant_orders_status_idx
    ON merchant_orders (merchant_id, status, created_at, order_id);
-- (No index on order_id alone: every index here is paid by each flash order the consumer
-- writes; the status trigger finds the rows through the primary key instead.)

-- Statement-level: the flash consumer inserts thousands of items in one statement, and one
-- grouped INSERT per statement costs far less than a trigger call per row.
CREATE FUNCTION merchant_orders_from_items() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO merchant_orders AS mo
        (merchant_id, order_id, created_at, status, user_id, units, amount_cents)
    SELECT p.merchant_id, o.id, o.created_at, o.status, o.user_id,
           sum(n.quantity), sum(n.quantity * n.price_cents)
    FROM new_items n
    JOIN products p ON p.id = n.product_id
    JOIN orders o ON o.id = n.order_id
    GROUP BY p.merchant_id, o.id, o.created_at, o.status, o.user_id
    ON CONFLICT (merchant_id, order_id) DO UPDATE
        SET units = mo.units + excluded.units,
            amount_cents = mo.amount_cents + excluded.amount_cents;
    RETURN NULL;
END $$;
CREATE TRIGGER order_items_merchant_orders
    AFTER INSERT ON order_items REFERENCING NEW TABLE AS new_items
    FOR EACH STATEMENT EXECUTE FUNCTION merchant_orders_from_items();

CREATE FUNCTION merchant_orders_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE merchant_orders SET status = NEW.status
    WHERE order_id = NEW.id AND merchant_id IN (
        SELECT p.merchant_id FROM order_items oi JOIN products p ON p.id = oi.product_id
        WHERE oi.order_id = NEW.id);
    RETURN NULL;
END $$;
CREATE TRIGGER orders_merchant_status
    AFTER UPDATE OF status ON orders
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION merchant_orders_status();

-- Orders written before this migration.
INSERT INTO merchant_orders (merchant_id, order_id, created_at, status, user_id, units,
                             amount_cents)
SELECT p.merchant_id, o.id, o.created_at, o.status, o.user_id,
       sum(oi.quantity), sum(oi.quantity * oi.price_cents)
FROM order_items oi
JOIN products p ON p.id = oi.product_id
JOIN orders o ON o.id = oi.order_id
GROUP BY p.merchant_id, o.id, o.created_at, o.status, o.user_id;

-- The admin list: newest first, by status, by date.
CREATE INDEX orders_created_idx ON orders (created_at, id);
CREATE INDEX orders_status_created_idx ON orders (status, created_at, id);

-- The admin user search: prefix match on email, phone and nickname, any case.
CREATE INDEX users_email_prefix_idx ON users (lower(email) text_pattern_ops);
CREATE INDEX users_phone_prefix_idx ON users (phone text_pattern_ops);
CREATE INDEX users_nickname_prefix_idx ON users (lower(nickname) text_pattern_ops);

-- Returns and refunds after shipping. status:
--   return_requested → return_approved → refunded   (the merchant or an admin approves;
--                                                     the provider refund runs at once)
--   return_requested → return_rejected               (with a note)
-- kind: 'return' (the goods come back: restocked on approval) or 'refund' (money only).
-- At most one open request per order; refund_id names the refund the approval made.
CREATE TABLE order_returns (
    id            TEXT PRIMARY KEY,
    order_id      TEXT        NOT NULL REFERENCES orders (id),
    user_id       BIGINT      NOT NULL REFERENCES users (id),
    kind          TEXT        NOT NULL CHECK (kind IN ('return', 'refund')),
    status        TEXT        NOT NULL DEFAULT 'return_requested' CHECK (status IN (
                      'return_requested', 'return_approved', 'return_rejected', 'refunded')),
    reason        TEXT        NOT NULL,
    amount_cents  BIGINT      NOT NULL CHECK (amount_cents > 0),
    items         JSONB       NOT NULL DEFAULT '[]',
    decided_by    BIGINT REFERENCES users (id),
    decision_note TEXT,
    refund_id     TEXT REFERENCES refunds (id),
    restocked     BOOLEAN     NOT NULL DEFAULT false,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    decided_at    TIMESTAMPTZ,
    refunded_at   TIMESTAMPTZ
);
CREATE INDEX order_returns_order_idx ON order_returns (order_id, created_at);
CREATE UNIQUE INDEX order_returns_one_open_uq ON order_returns (order_id)
    WHERE status = 'return_requested';
CREATE INDEX order_returns_open_idx ON order_returns (created_at)
    WHERE status = 'return_requested';

-- Storefront orders, payments and regular-stock reservations (issue 4).
--
-- A reservation holds `quantity` units of a SKU (skus.reserved) until it is consumed by a
-- payment or released by a cancel or its expiry; the status column is the exactly-once
-- guard: every transition is `UPDATE ... WHERE status = 'active' RETURNING`.

CREATE TABLE stock_reservations (
    id              TEXT PRIMARY KEY,
    sku_id          BIGINT      NOT NULL REFERENCES skus (id),
    order_id        TEXT,
    quantity        INTEGER     NOT NULL CHECK (quantity > 0),
    consumed        INTEGER     NOT NULL DEFAULT 0 CHECK (consumed >= 0),
    status          TEXT        NOT NULL DEFAULT 'active'
                        CHECK (status IN ('active', 'consumed', 'released')),
    reserved_until  TIMESTAMPTZ NOT NULL,
    release_reason  TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (consumed <= quantity)
);
CREATE INDEX stock_reservations_expiry_idx
    ON stock_reservations (reserved_until) WHERE status = 'active';
CREATE INDEX stock_reservations_order_idx ON stock_reservations (order_id);

-- Seed 002 scheme 3: identical item snapshots are stored once, keyed by a hash of their data.
CREATE TABLE item_snapshots (
    id           BIGSERIAL PRIMARY KEY,
    content_hash TEXT        NOT NULL UNIQUE,
    product_id   BIGINT      NOT NULL REFERENCES products (id),
    sku_id       BIGINT      NOT NULL REFERENCES skus (id),
    data         JSONB       NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

ALTER TABLE order_items ADD COLUMN snapshot_id BIGINT REFERENCES item_snapshots (id);

ALTER TABLE orders
    ADD COLUMN coupon_code        TEXT,
    ADD COLUMN coupon_use_id      BIGINT,
    ADD COLUMN refunded_cents     BIGINT NOT NULL DEFAULT 0 CHECK (refunded_cents >= 0),
    ADD COLUMN shipping_company   TEXT,
    ADD COLUMN tracking_number    TEXT,
    ADD COLUMN estimated_delivery TEXT,
    ADD COLUMN shipped_at         TIMESTAMPTZ,
    ADD COLUMN delivered_at       TIMESTAMPTZ,
    ADD COLUMN completed_at       TIMESTAMPTZ;

-- Idempotency-Key of POST /orders and checkout: the same key (per user) is the same order.
CREATE TABLE order_idempotency (
    user_id    BIGINT      NOT NULL REFERENCES users (id),
    key        TEXT        NOT NULL,
    order_id   TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);

-- One row per state change of an order: who, when, from, to.
CREATE TABLE order_logs (
    id          BIGSERIAL PRIMARY KEY,
    order_id    TEXT        NOT NULL REFERENCES orders (id),
    actor_id    BIGINT,
    actor_role  TEXT        NOT NULL,
    from_status TEXT,
    to_status   TEXT        NOT NULL,
    note        TEXT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX order_logs_order_idx ON order_logs (order_id, id);

-- Pay orders (seed 002): one attempt to pay an order with one method.
CREATE TABLE pay_orders (
    id             TEXT PRIMARY KEY,
    order_id       TEXT        NOT NULL REFERENCES orders (id),
    user_id        BIGINT      NOT NULL REFERENCES users (id),
    amount_cents   BIGINT      NOT NULL CHECK (amount_cents >= 0),
    method         TEXT        NOT NULL,
    status         TEXT        NOT NULL DEFAULT 'pending'
                       CHECK (status IN ('pending', 'success', 'failed', 'closed')),
    transaction_id TEXT,
    return_url     TEXT,
    expires_at     TIMESTAMPTZ NOT NULL,
    paid_at        TIMESTAMPTZ,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX pay_orders_order_idx ON pay_orders (order_id);
CREATE UNIQUE INDEX pay_orders_one_pending_uq ON pay_orders (order_id) WHERE status = 'pending';
CREATE UNIQUE INDEX pay_orders_one_success_uq ON pay_orders (order_id) WHERE status = 'success';

-- Every notification received; dedupe_key is set only for accepted ones, so a replay of an
-- accepted notification is recognised and changes nothing.
CREATE TABLE payment_notifications (
    id          BIGSERIAL PRIMARY KEY,
    payment_id  TEXT,
    order_id    TEXT,
    dedupe_key  TEXT UNIQUE,
    accepted    BOOLEAN     NOT NULL,
    outcome     TEXT        NOT NULL,
    body        JSONB       NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX payment_notifications_payment_idx ON payment_notifications (payment_id);

CREATE TABLE refunds (
    id           TEXT PRIMARY KEY,
    order_id     TEXT        NOT NULL REFERENCES orders (id),
    pay_order_id TEXT        NOT NULL REFERENCES pay_orders (id),
    amount_cents BIGINT      NOT NULL CHECK (amount_cents > 0),
    reason       TEXT        NOT NULL,
    status       TEXT        NOT NULL CHECK (status IN ('processing', 'completed', 'failed')),
    requested_by BIGINT      NOT NULL REFERENCES users (id),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    completed_at TIMESTAMPTZ
);
CREATE INDEX refunds_order_idx ON refunds (order_id);

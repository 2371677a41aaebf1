-- Cart, coupons and amount-off promotions (issue 4).
--
-- Carts live in PostgreSQL rather than a Redis hash: a cart item needs a stable numeric
-- cart_item_id, ownership checks, an atomic "same SKU + specification adds up" merge
-- (one INSERT .. ON CONFLICT) and checkout joins it with skus for price and stock in
-- one query. A guest cart is a row keyed by an opaque token with an expiry (its TTL).

CREATE TABLE carts (
    id          BIGSERIAL PRIMARY KEY,
    user_id     BIGINT UNIQUE REFERENCES users (id),
    guest_token TEXT UNIQUE,
    expires_at  TIMESTAMPTZ,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((user_id IS NULL) <> (guest_token IS NULL)),
    CHECK (guest_token IS NULL OR expires_at IS NOT NULL)
);
CREATE INDEX carts_guest_expiry_idx ON carts (expires_at) WHERE guest_token IS NOT NULL;

CREATE TABLE cart_items (
    id            BIGSERIAL PRIMARY KEY,
    cart_id       BIGINT      NOT NULL REFERENCES carts (id) ON DELETE CASCADE,
    product_id    BIGINT      NOT NULL REFERENCES products (id),
    sku_id        BIGINT      NOT NULL REFERENCES skus (id),
    quantity      INTEGER     NOT NULL CHECK (quantity > 0),
    specification JSONB       NOT NULL DEFAULT '{}',
    -- canonical (sorted-key) JSON text of specification: the merge key with sku_id
    spec_key      TEXT        NOT NULL DEFAULT '{}',
    selected      BOOLEAN     NOT NULL DEFAULT true,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (cart_id, sku_id, spec_key)
);

-- A coupon template: anyone may use its code within the window, up to
-- max_uses_per_user times each and total_quantity times overall (NULL = unlimited).
CREATE TABLE coupons (
    id                 BIGSERIAL PRIMARY KEY,
    code               TEXT        NOT NULL UNIQUE,
    name               TEXT        NOT NULL,
    type               TEXT        NOT NULL CHECK (type IN ('amount_off', 'percent_off', 'free_shipping')),
    amount_off_cents   BIGINT      CHECK (amount_off_cents > 0),
    percent_off        INTEGER     CHECK (percent_off BETWEEN 1 AND 100),
    max_discount_cents BIGINT      CHECK (max_discount_cents > 0),
    min_amount_cents   BIGINT      NOT NULL DEFAULT 0 CHECK (min_amount_cents >= 0),
    scope              TEXT        NOT NULL DEFAULT 'all' CHECK (scope IN ('all', 'categories', 'products')),
    category_ids       BIGINT[]    NOT NULL DEFAULT '{}',
    product_ids        BIGINT[]    NOT NULL DEFAULT '{}',
    starts_at          TIMESTAMPTZ NOT NULL,
    ends_at            TIMESTAMPTZ NOT NULL,
    max_uses_per_user  INTEGER     NOT NULL DEFAULT 1 CHECK (max_uses_per_user >= 1),
    total_quantity     INTEGER     CHECK (total_quantity >= 0),
    used_count         INTEGER     NOT NULL DEFAULT 0 CHECK (used_count >= 0),
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (starts_at < ends_at),
    CHECK (total_quantity IS NULL OR used_count <= total_quantity),
    CHECK (type <> 'amount_off' OR amount_off_cents IS NOT NULL),
    CHECK (type <> 'percent_off' OR percent_off IS NOT NULL)
);

-- Per-user use counter: the conditional upsert on it is the atomic per-user limit.
CREATE TABLE coupon_user_counts (
    coupon_id BIGINT  NOT NULL REFERENCES coupons (id),
    user_id   BIGINT  NOT NULL REFERENCES users (id),
    used      INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0),
    PRIMARY KEY (coupon_id, user_id)
);

-- One row per redemption by an order; released (exactly once) when the order fails.
CREATE TABLE coupon_uses (
    id             BIGSERIAL PRIMARY KEY,
    coupon_id      BIGINT      NOT NULL REFERENCES coupons (id),
    user_id        BIGINT      NOT NULL REFERENCES users (id),
    order_id       TEXT        NOT NULL,
    discount_cents BIGINT      NOT NULL CHECK (discount_cents >= 0),
    status         TEXT        NOT NULL DEFAULT 'used' CHECK (status IN ('used', 'released')),
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    released_at    TIMESTAMPTZ
);
CREATE UNIQUE INDEX coupon_uses_order_used_uq ON coupon_uses (order_id) WHERE status = 'used';
CREATE INDEX coupon_uses_user_idx ON coupon_uses (user_id, coupon_id);

-- Tiered amount-off promotion: rules = [{"min_amount": cents, "discount_amount": cents}];
-- an empty category_ids means every category.
CREATE TABLE promotions (
    id           BIGSERIAL PRIMARY KEY,
    name         TEXT        NOT NULL,
    rules        JSONB       NOT NULL,
    category_ids BIGINT[]    NOT NULL DEFAULT '{}',
    starts_at    TIMESTAMPTZ NOT NULL,
    ends_at      TIMESTAMPTZ NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (starts_at < ends_at)
);
CREATE INDEX promotions_window_idx ON promotions (ends_at, starts_at);

-- The response of a cart checkout under a client's Idempotency-Key: a retry after the
-- ordered items left the cart returns the same order instead of "nothing selected".
CREATE TABLE cart_checkouts (
    user_id         BIGINT      NOT NULL REFERENCES users (id),
    idempotency_key TEXT        NOT NULL,
    result          JSONB       NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, idempotency_key)
);

-- Catalog search indexes and presale (seed 001): campaigns with pre-occupied stock, and
-- presale orders.

CREATE EXTENSION IF NOT EXISTS pg_trgm;

-- Search: ILIKE '%term%' on name and description together, served by a trigram GIN index
-- on the same expression the catalog query uses.
CREATE INDEX products_search_trgm_idx ON products
    USING gin ((name || ' ' || description) gin_trgm_ops);
CREATE INDEX products_on_sale_created_idx ON products (created_at DESC, id DESC)
    WHERE status = 'on_sale';
CREATE INDEX products_on_sale_sales_idx ON products (sales DESC, id DESC) WHERE status = 'on_sale';
CREATE INDEX skus_product_price_idx ON skus (product_id, price_cents);

-- One presale campaign sells up to `total` units of one SKU before release. Its stock is
-- its own (pre-release units are not part of skus.on_hand): available = total - preoccupied,
-- where preoccupied is the sum of the quantities of its non-cancelled presale orders.
CREATE TABLE presale_campaigns (
    id          BIGSERIAL PRIMARY KEY,
    product_id  BIGINT      NOT NULL REFERENCES products (id),
    sku_id      BIGINT      NOT NULL REFERENCES skus (id),
    price_cents BIGINT      NOT NULL CHECK (price_cents >= 0),
    total       INTEGER     NOT NULL CHECK (total >= 0),
    preoccupied INTEGER     NOT NULL DEFAULT 0 CHECK (preoccupied >= 0),
    starts_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    ends_at     TIMESTAMPTZ NOT NULL,
    created_by  BIGINT      NOT NULL REFERENCES users (id),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (preoccupied <= total),
    CHECK (starts_at < ends_at)
);
CREATE INDEX presale_campaigns_product_idx ON presale_campaigns (product_id, sku_id);

-- Lifecycle (seed 001): pending -> paid -> shipped -> completed; pending/paid -> cancelled.
CREATE TABLE presale_orders (
    id           TEXT PRIMARY KEY,
    campaign_id  BIGINT      NOT NULL REFERENCES presale_campaigns (id),
    user_id      BIGINT      NOT NULL REFERENCES users (id),
    product_id   BIGINT      NOT NULL REFERENCES products (id),
    sku_id       BIGINT      NOT NULL REFERENCES skus (id),
    quantity     INTEGER     NOT NULL CHECK (quantity > 0),
    price_cents  BIGINT      NOT NULL CHECK (price_cents >= 0),
    total_cents  BIGINT      NOT NULL CHECK (total_cents >= 0),
    status       TEXT        NOT NULL DEFAULT 'pending' CHECK (status IN (
                     'pending', 'paid', 'shipped', 'completed', 'cancelled')),
    version      INTEGER     NOT NULL DEFAULT 1,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    paid_at      TIMESTAMPTZ,
    cancelled_at TIMESTAMPTZ
);
CREATE INDEX presale_orders_user_idx ON presale_orders (user_id, created_at DESC);
CREATE INDEX presale_orders_created_idx ON presale_orders (created_at DESC);

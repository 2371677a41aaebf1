-- Flash sales. A sale's allotment (quantity) is carved out of the SKU's on_hand in the
-- same transaction that creates or tops up the sale, so regular checkout and the sale
-- never sell the same unit.
--   quantity          = units ever moved from the SKU into the sale (creation + top-ups)
--   sold_quantity     = units of live (not cancelled) persisted orders
--   returned_quantity = units moved back to the SKU after close/end (monotonic)
CREATE TABLE flash_sales (
    id                BIGSERIAL PRIMARY KEY,
    sku_id            BIGINT      NOT NULL REFERENCES skus (id),
    product_id        BIGINT      NOT NULL REFERENCES products (id),
    flash_price_cents BIGINT      NOT NULL CHECK (flash_price_cents >= 0),
    quantity          INTEGER     NOT NULL CHECK (quantity > 0),
    sold_quantity     INTEGER     NOT NULL DEFAULT 0 CHECK (sold_quantity >= 0),
    returned_quantity INTEGER     NOT NULL DEFAULT 0 CHECK (returned_quantity >= 0),
    per_user_limit    INTEGER     NOT NULL CHECK (per_user_limit > 0),
    start_at          TIMESTAMPTZ NOT NULL,
    end_at            TIMESTAMPTZ NOT NULL,
    payment_window_s  INTEGER     NOT NULL CHECK (payment_window_s > 0),
    closed_at         TIMESTAMPTZ,
    created_by        BIGINT REFERENCES users (id),
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (end_at > start_at),
    CHECK (sold_quantity + returned_quantity <= quantity)
);
CREATE INDEX flash_sales_end_idx ON flash_sales (end_at);

ALTER TABLE orders ADD COLUMN flash_sale_id BIGINT REFERENCES flash_sales (id);
-- For cancelled flash orders: false until the units are back in Redis (sale or SKU path).
ALTER TABLE orders ADD COLUMN flash_units_returned BOOLEAN NOT NULL DEFAULT false;
CREATE INDEX orders_flash_sale_idx ON orders (flash_sale_id, user_id) WHERE flash_sale_id IS NOT NULL;
CREATE INDEX orders_flash_unreturned_idx ON orders (flash_sale_id)
    WHERE kind = 'flash' AND status = 'cancelled' AND NOT flash_units_returned;

ALTER TABLE inventory_ledger ADD COLUMN flash_sale_id BIGINT REFERENCES flash_sales (id);

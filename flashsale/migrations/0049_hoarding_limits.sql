-- Hoarding limits (issue "Money and account safety", finding 11).
--
-- A user may hold at most max_per_user units of a SKU in unpaid orders at once; NULL takes
-- the default from FLASHSALE_MAX_PER_USER_DEFAULT. Order reservations carry the buyer so
-- that the count is one indexed sum over that user's active reservations.
ALTER TABLE products
    ADD COLUMN max_per_user INTEGER CHECK (max_per_user IS NULL OR max_per_user >= 1);

ALTER TABLE stock_reservations ADD COLUMN user_id BIGINT REFERENCES users (id);
CREATE INDEX stock_reservations_user_active_idx
    ON stock_reservations (user_id, sku_id) WHERE status = 'active' AND user_id IS NOT NULL;

-- One order per cart checkout: concurrent checkouts of one cart generation share the
-- idempotency key cart:<id>:<checkout_seq>; a finished checkout moves to the next one.
ALTER TABLE carts ADD COLUMN checkout_seq INTEGER NOT NULL DEFAULT 0;

-- Presale holds expire (finding 11): a pending presale order pre-occupies campaign units
-- until expires_at; the store sweeper then cancels it and returns them (exactly once, by
-- the status-guarded cancel). Orders already pending get a fresh hold from now.
ALTER TABLE presale_orders ADD COLUMN expires_at TIMESTAMPTZ;
UPDATE presale_orders SET expires_at = now() + interval '30 minutes' WHERE status = 'pending';
CREATE INDEX presale_orders_expiry_idx ON presale_orders (expires_at) WHERE status = 'pending';

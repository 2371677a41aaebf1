-- Token revocation and disabled accounts.
-- token_gen: every token carries the generation current when it was issued; a role or
-- password change, a logout or disabling the account bumps it, and tokens of an older
-- generation are refused (the gateway keeps the bumped values in Redis, see
-- gateway/sessions.py). disabled_at: a disabled account cannot log in.

ALTER TABLE users ADD COLUMN token_gen   INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN disabled_at TIMESTAMPTZ;

-- A flash sale's mode: 'open' (the fastest join wins, as before) or 'queued' (a waiting
-- room in front of the join: see flashsale/waitingroom/). queue_settings holds the sale's
-- own queue and bot-defence settings (a JSON object; missing keys take the FLASHSALE_QUEUE_*
-- defaults), checked by the API before they are stored.
ALTER TABLE flash_sales ADD COLUMN mode TEXT NOT NULL DEFAULT 'open'
    CHECK (mode IN ('open', 'queued'));
ALTER TABLE flash_sales ADD COLUMN queue_settings JSONB NOT NULL DEFAULT '{}'::jsonb
    CHECK (jsonb_typeof(queue_settings) = 'object');

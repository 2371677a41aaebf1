-- A consumer claims reservations before persisting them, so that a late compensation can
-- no longer release units whose order is being written. A claim is timed: one that is
-- still here long after (its consumer died and the broker lost the event) is republished
-- by the sweeper, so every reservation has an owner until its order is in PostgreSQL.
-- KEYS[1] log  KEYS[2] log times  KEYS[3] claimed  KEYS[4] void  KEYS[5] claim times
-- ARGV = order ids
-- Returns (flashsale/stores/scripts.py Claim) one code per id:
--   0 NOT_IN_REDIS
--   1 CLAIMED now
--   2 ALREADY_CLAIMED
--   3 VOIDED: compensated, never persist it
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, order_id in ipairs(ARGV) do
  local entry = redis.call('HGET', KEYS[1], order_id)
  if entry then
    redis.call('HSET', KEYS[3], order_id, entry)
    redis.call('ZADD', KEYS[5], now, order_id)
    redis.call('HDEL', KEYS[1], order_id)
    redis.call('ZREM', KEYS[2], order_id)
    out[i] = 1
  elseif redis.call('HEXISTS', KEYS[3], order_id) == 1 then
    redis.call('ZADD', KEYS[5], 'GT', now, order_id)
    out[i] = 2
  elseif redis.call('SISMEMBER', KEYS[4], order_id) == 1 then
    out[i] = 3
  else
    out[i] = 0
  end
end
return out

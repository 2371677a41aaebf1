-- Compensation: give back a reservation whose event the broker never acknowledged.
-- KEYS[1] sale  KEYS[2] users  KEYS[3] first order  KEYS[4] log  KEYS[5] log times
-- KEYS[6] void  KEYS[7] idempotency
-- ARGV[1] order id  ARGV[2] user id  ARGV[3] quantity  ARGV[4] idempotency field ("" = none)
-- KEYS[8] claimed
-- Returns (flashsale/stores/scripts.py Release):
--   0 CLAIMED by a consumer already: the order stands
--   1 RELEASED
--   2 NOT_FOUND anywhere: Redis lost it, whether the order stands is unknown
--   3 PROMISED: another answer already named it to the shopper (a keyed retry's replay,
--     or LIMIT_EXCEEDED naming the order they have; lua/reserve.lua marks it "p:<order
--     id>" in the idempotency hash): it stays in the log, and the stranded sweeper
--     publishes it
local order_id, user, qty = ARGV[1], ARGV[2], tonumber(ARGV[3])
if redis.call('HEXISTS', KEYS[7], 'p:' .. order_id) == 1 then return 3 end
if redis.call('HDEL', KEYS[4], order_id) == 0 then
  if redis.call('HEXISTS', KEYS[8], order_id) == 1 then return 0 end
  return 2
end
redis.call('ZREM', KEYS[5], order_id)
redis.call('SADD', KEYS[6], order_id)
if redis.call('HGET', KEYS[1], 'closed') == '1' then
  redis.call('HINCRBY', KEYS[1], 'moved_out', qty)
else
  redis.call('HINCRBY', KEYS[1], 'remaining', qty)
end
if tonumber(redis.call('HINCRBY', KEYS[2], user, -qty)) <= 0 then
  redis.call('HDEL', KEYS[2], user)
end
if redis.call('HGET', KEYS[3], user) == order_id then
  redis.call('HDEL', KEYS[3], user)
end
if ARGV[4] ~= '' then
  redis.call('HDEL', KEYS[7], ARGV[4])
end
return 1

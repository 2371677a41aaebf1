-- Units of a cancelled order go back exactly once: to the sale while it runs, to the
-- SKU (via moved_out, settled into PostgreSQL) once it is closed.
-- KEYS[1] sale  KEYS[2] users  KEYS[3] returned set
-- ARGV[1] order id  ARGV[2] user id  ARGV[3] quantity
-- Returns (flashsale/stores/scripts.py ReturnUnits):
--  -1 UNKNOWN_SALE
--   0 ALREADY_RETURNED
--   1 RETURNED now
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('SADD', KEYS[3], ARGV[1]) == 0 then return 0 end
local qty = tonumber(ARGV[3])
if redis.call('HGET', KEYS[1], 'closed') == '1' then
  redis.call('HINCRBY', KEYS[1], 'moved_out', qty)
else
  redis.call('HINCRBY', KEYS[1], 'remaining', qty)
end
if tonumber(redis.call('HINCRBY', KEYS[2], ARGV[2], -qty)) <= 0 then
  redis.call('HDEL', KEYS[2], ARGV[2])
end
return 1

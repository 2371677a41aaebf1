-- Close a sale: no more reservations; what remains is moved out, to go back to the SKU.
-- KEYS[1] sale
-- Returns (flashsale/stores/scripts.py SaleClose) moved_out (>= 0, monotonic), or:
--  -1 UNKNOWN_SALE
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('HSET', KEYS[1], 'closed', 1)
local remaining = tonumber(redis.call('HGET', KEYS[1], 'remaining'))
if remaining > 0 then
  redis.call('HSET', KEYS[1], 'remaining', 0)
  redis.call('HINCRBY', KEYS[1], 'moved_out', remaining)
end
return tonumber(redis.call('HGET', KEYS[1], 'moved_out'))

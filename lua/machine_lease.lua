-- Acquire or renew a machine-id lease.
-- KEYS[1] = fs:machine:<n>
-- ARGV[1] = owner token, ARGV[2] = ttl in ms
-- Returns (flashsale/stores/scripts.py Lease):
--   0 TAKEN by another owner
--   1 HELD by the caller now
local current = redis.call('GET', KEYS[1])
if current == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0

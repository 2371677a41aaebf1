-- Give units of this bucket of a sale to another bucket whose shoppers found theirs empty
-- (flashsale/flash/buckets.py). The units leave `remaining` and wait in this bucket's
-- transfer log until lua/bucket_take.lua credits them there and the giver (or the sweeper)
-- drops the entry: a unit is never counted in two buckets, nor lost when the giver dies
-- between the two steps. A sale's recount (consumers/recovery.py) starts a new epoch and
-- clears every transfer log: a transfer of an older epoch is never credited.
-- KEYS[1] giving bucket's sale hash  KEYS[2] its transfers out
-- ARGV[1] this bucket's index  ARGV[2] the receiving bucket's index
-- ARGV[3] units wanted (at least; half of what is left is given when that is more)
-- Every give and take adds one to the bucket's `moves`: a reader that finds every bucket
-- empty and then the same `moves` everywhere knows no unit was in transit meanwhile.
-- Returns (flashsale/stores/scripts.py Give) {status, ...}, the status one of:
--   0 GIVEN {units, transfer id}
--   1 EMPTY {moves}: nothing left here (or the sale is closed)
--   2 RECOVERING: not armed under this server's run; its counters wait for a recount
--   3 GIVING {moves}: nothing left here, but units it gave are not credited yet
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
local s = redis.call('HMGET', KEYS[1], 'armed', 'remaining', 'closed', 'epoch', 'moves')
if s[1] ~= run_id then return {2} end
local left = tonumber(s[2] or '0')
local moves = tonumber(s[5] or '0')
if s[3] == '1' then return {1, moves} end
if left <= 0 then
  if redis.call('HLEN', KEYS[2]) > 0 then return {3, moves} end
  return {1, moves}
end
redis.call('HINCRBY', KEYS[1], 'moves', 1)
local units = math.min(left, math.max(tonumber(ARGV[3]), math.ceil(left / 2)))
redis.call('HINCRBY', KEYS[1], 'remaining', -units)
local seq = redis.call('HINCRBY', KEYS[1], 'xseq', 1)
local id = (s[4] or '0') .. '/' .. ARGV[1] .. '/' .. seq
local t = redis.call('TIME')
redis.call('HSET', KEYS[2], id, ARGV[2] .. '|' .. units .. '|' .. t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000)))
return {0, units, id}

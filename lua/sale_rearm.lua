-- Re-arm a sale after Redis may have lost writes (a restart, a failover, a lost key):
-- write counters recomputed from the record (PostgreSQL) and the orders still in flight
-- (Kafka's unconsumed events, the reservation log, the claims), and stamp the sale with
-- this server's run id so that joins pass reserve.lua's fence again.
-- KEYS[1] sale  KEYS[2] users  KEYS[3] first order  KEYS[4] log  KEYS[5] log times
-- KEYS[6] claimed  KEYS[7] returned  KEYS[8] transfers out  KEYS[9] transfers in
-- ARGV[1] the run id the caller read before it took its snapshot
-- ARGV[2] JSON {allotment, remaining, moved_out, closed, users: {user: units},
--               first: {user: order id}, inflight: {order id: packed entry},
--               returned: [order id]}
--         (for one bucket of a sale split into buckets: that bucket's share of each)
-- ARGV[3] "" for a sale of one bucket; for a bucket of a split sale, the token the
--         recount fenced every bucket with: it becomes the sale's new epoch, and the
--         transfers of the old one are dropped (the recount counted their units)
-- Returns (flashsale/stores/scripts.py Rearm):
--  -2 FENCE_CHANGED: another recount fenced this bucket since (its own snapshot wins)
--  -1 RUN_CHANGED: the server's run id is not ARGV[1] (Redis restarted during the
--     snapshot: take a new one)
--   0 ALREADY_ARMED under this run id: nothing written
--   1 ARMED
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
if run_id ~= ARGV[1] then return -1 end
local token = ARGV[3] or ''
if token ~= '' and redis.call('HGET', KEYS[1], 'fence') ~= token then return -2 end
if redis.call('HGET', KEYS[1], 'armed') == run_id then return 0 end
local s = cjson.decode(ARGV[2])
redis.call('DEL', KEYS[2], KEYS[3])
for user, units in pairs(s.users) do
  redis.call('HSET', KEYS[2], user, units)
end
for user, order_id in pairs(s.first) do
  redis.call('HSET', KEYS[3], user, order_id)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- An in-flight order Redis no longer knew gets an owner again: the sweeper republishes
-- it if the broker loses it too; the consumer's claim finds it like any other.
for order_id, entry in pairs(s.inflight) do
  if redis.call('HEXISTS', KEYS[6], order_id) == 0
     and redis.call('HSETNX', KEYS[4], order_id, entry) == 1 then
    redis.call('ZADD', KEYS[5], now, order_id)
  end
end
for _, order_id in ipairs(s.returned) do
  redis.call('SADD', KEYS[7], order_id)
end
if token ~= '' then
  redis.call('DEL', KEYS[8], KEYS[9])
  redis.call('HSET', KEYS[1], 'epoch', token)
  redis.call('HDEL', KEYS[1], 'fence')
end
redis.call('HSET', KEYS[1], 'allotment', s.allotment, 'remaining', s.remaining,
           'moved_out', s.moved_out, 'closed', s.closed, 'armed', run_id)
return 1

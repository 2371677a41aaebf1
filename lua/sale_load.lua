-- Load or update a sale's state. Counters are never reset: a new allotment adds only the
-- difference, so loading twice (or a retried top-up) never adds units twice.
-- KEYS[1] sale (the caller adds the id to the sales index separately: another slot)
-- ARGV[1] sale id  ARGV[2] allotment  ARGV[3] "1" when the sale was just created (nothing
-- can have been sold yet)  then field/value pairs of static settings
-- A new sale is armed under this server's run id. A sale whose state is missing but that
-- is not new (Redis lost it) is written unarmed: joins answer "recovering" until the
-- recovery sweeper recomputes its counters from PostgreSQL and the broker and arms it.
-- Returns (flashsale/stores/scripts.py SaleLoad) {remaining (>= 0), allotment}, or {status}:
--  -1 CLOSED: the sale is closed and the allotment grew
local allotment = tonumber(ARGV[2])
local current = redis.call('HGET', KEYS[1], 'allotment')
if current == false then
  redis.call('HSET', KEYS[1], 'allotment', allotment, 'remaining', allotment,
             'moved_out', 0, 'closed', 0)
  if ARGV[3] == '1' then
    local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
    redis.call('HSET', KEYS[1], 'armed', run_id)
  else
    redis.call('HSET', KEYS[1], 'remaining', 0)
  end
else
  local delta = allotment - tonumber(current)
  if delta > 0 then
    if redis.call('HGET', KEYS[1], 'closed') == '1' then return {-1} end
    redis.call('HINCRBY', KEYS[1], 'remaining', delta)
    redis.call('HSET', KEYS[1], 'allotment', allotment)
  end
end
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
return {tonumber(redis.call('HGET', KEYS[1], 'remaining')), allotment}

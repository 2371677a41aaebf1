-- Credit a transfer from another bucket of the same sale (lua/bucket_give.lua), once.
-- KEYS[1] receiving bucket's sale hash  KEYS[2] its set of credited transfer ids
-- ARGV[1] transfer id ("<epoch>/<giving bucket>/<seq>")  ARGV[2] units
-- Returns (flashsale/stores/scripts.py Take):
--  -1 STALE: given before the sale's last recount, which counted its units already: drop it
--   0 ALREADY credited
--   1 CREDITED now (to `remaining`, or to `moved_out` once the sale is closed)
--   2 RECOVERING: not armed under this server's run; try again after its recount
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
local s = redis.call('HMGET', KEYS[1], 'armed', 'closed', 'epoch')
local epoch = string.match(ARGV[1], '^([^/]*)/')
if s[1] ~= run_id then return 2 end
if epoch ~= (s[3] or '0') then return -1 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'moves', 1)  -- see lua/bucket_give.lua
if s[2] == '1' then
  redis.call('HINCRBY', KEYS[1], 'moved_out', tonumber(ARGV[2]))
else
  redis.call('HINCRBY', KEYS[1], 'remaining', tonumber(ARGV[2]))
end
return 1

-- Move one contingency plan to a new mode, log it and tell every worker; nothing when the
-- move does not apply (so N workers seeing one trigger write one log line).
-- KEYS[1] = fs:{plans}:state (hash plan -> JSON state)
-- KEYS[2] = fs:{plans}:version (counter)
-- KEYS[3] = fs:{plans}:log (stream: the operation log of the plans)
-- ARGV[1] = plan name, ARGV[2] = new mode (off | armed | on), ARGV[3] = new state (JSON)
-- ARGV[4] = "1" when the plan's own trigger moves it (armed -> on, or an automatic on -> armed)
-- ARGV[5] = log length kept, ARGV[6] = pub/sub channel, ARGV[7] = who, ARGV[8] = why
-- Returns (flashsale/stores/scripts.py PlanSwitch):
--   0 UNCHANGED the plan was already in that mode (same options), or its trigger may not move it
--   1 SWITCHED the mode changed, was logged and published
local name, mode, auto = ARGV[1], ARGV[2], ARGV[4] == '1'
local raw = redis.call('HGET', KEYS[1], name)
local from, was_auto, same_options = 'off', false, true
if raw then
  local current = cjson.decode(raw)
  from = current['mode']
  was_auto = current['auto'] == true
  local new_options = cjson.decode(ARGV[3])['options']
  same_options = cjson.encode(current['options'] or {}) == cjson.encode(new_options or {})
end
if auto then
  -- a trigger only acts on an armed plan, and only takes back what it switched on itself
  if mode == 'on' and from ~= 'armed' then return 0 end
  if mode == 'armed' and not (from == 'on' and was_auto) then return 0 end
elseif from == mode and not was_auto and same_options then
  return 0
end
redis.call('HSET', KEYS[1], name, ARGV[3])
local version = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*',
  'plan', name, 'from', from, 'to', mode, 'by', ARGV[7], 'reason', ARGV[8],
  'auto', auto and '1' or '0')
redis.call('PUBLISH', ARGV[6], tostring(version))
return 1

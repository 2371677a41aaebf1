-- One admission step of a queued sale, run by the one worker holding the sale's admitter lease.
-- KEYS[1] sale hash  KEYS[2] queue hash  KEYS[3] lottery  KEYS[4] arrivals  KEYS[5] entrants
-- KEYS[6] outstanding admissions (sorted set user -> window end ms)
-- KEYS[7] admission log (list of "last position|admitted at ms")  KEYS[8] sale users
-- ARGV[1] at most this many to admit now (the rate)  ARGV[2] overbooking factor
-- ARGV[3] join window (ms)  ARGV[4] at most this many outstanding admissions to look at
-- ARGV[5] run id of this server, as the caller's connection read it
-- The first step at or after the start draws the lottery (freezes it) if no entry did.
-- An outstanding admission ends when its shopper holds units (joined) or its window passes
-- (abandoned). Admission stops while nothing remains, and the outstanding admissions never
-- exceed floor(remaining x factor).
-- The result: {status, joined, abandoned, admitted through, outstanding, entered}, then for
-- ADMITTED the ms each one admitted waited since entering.
-- Returns (flashsale/stores/scripts.py QueueAdmit) {status, ...}, the status one of:
--   0 ADMITTED
--   1 IDLE: nobody to admit, or no room under remaining x factor
--   2 SOLD_OUT
--   3 NOT_STARTED
--   4 ENDED
--   5 UNKNOWN_SALE
--   6 RECOVERING: the sale's counters wait for a re-arm (see reserve.lua)
local s = redis.call('HMGET', KEYS[1], 'remaining', 'start_ms', 'end_ms', 'closed', 'armed')
if s[2] == false then return {5} end
if s[5] ~= ARGV[5] then return {6} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now < tonumber(s[2]) then return {3} end
if now >= tonumber(s[3]) or s[4] == '1' then return {4} end
if redis.call('HGET', KEYS[2], 'drawn') ~= '1' then
  redis.call('HSET', KEYS[2], 'drawn', 1, 'lottery', redis.call('ZCARD', KEYS[3]))
end

local joined, abandoned = 0, 0
local looked = redis.call('ZRANGE', KEYS[6], 0, tonumber(ARGV[4]) - 1, 'WITHSCORES')
for i = 1, #looked, 2 do
  local user = looked[i]
  if tonumber(redis.call('HGET', KEYS[8], user) or '0') > 0 then
    joined = joined + 1
    redis.call('ZREM', KEYS[6], user)
  elseif tonumber(looked[i + 1]) <= now then
    abandoned = abandoned + 1
    redis.call('ZREM', KEYS[6], user)
  end
end
if joined > 0 then redis.call('HINCRBY', KEYS[2], 'joined', joined) end
if abandoned > 0 then redis.call('HINCRBY', KEYS[2], 'abandoned', abandoned) end

local q = redis.call('HMGET', KEYS[2], 'lottery', 'arrived', 'admitted', 'entered')
local lottery, through = tonumber(q[1] or '0'), tonumber(q[3] or '0')
local total = lottery + tonumber(q[2] or '0')
local entered = tonumber(q[4] or '0')
local outstanding = redis.call('ZCARD', KEYS[6])
local remaining = tonumber(s[1])
if remaining <= 0 then return {2, joined, abandoned, through, outstanding, entered} end
local room = math.floor(remaining * tonumber(ARGV[2])) - outstanding
local n = math.min(tonumber(ARGV[1]), room, total - through)
if n <= 0 then return {1, joined, abandoned, through, outstanding, entered} end

local users = {}
if through < lottery then
  local upto = math.min(through + n, lottery)
  for _, u in ipairs(redis.call('ZRANGE', KEYS[3], through, upto - 1)) do users[#users + 1] = u end
end
if through + n > lottery then
  local first = math.max(through, lottery) - lottery
  for _, u in ipairs(redis.call('LRANGE', KEYS[4], first, through + n - lottery - 1)) do
    users[#users + 1] = u
  end
end
local out = {0, joined, abandoned, through + n, outstanding + n, entered}
local window_end = now + tonumber(ARGV[3])
for _, u in ipairs(users) do
  redis.call('ZADD', KEYS[6], window_end, u)
  local e = redis.call('HGET', KEYS[5], u)
  local at = e and tonumber(string.match(e, '(%d+)$')) or now
  out[#out + 1] = now - at
end
redis.call('HSET', KEYS[2], 'admitted', through + n)
redis.call('RPUSH', KEYS[7], (through + n) .. '|' .. now)
local keep_until = tonumber(s[3]) + 86400000
redis.call('PEXPIREAT', KEYS[6], keep_until)
redis.call('PEXPIREAT', KEYS[7], keep_until)
return out

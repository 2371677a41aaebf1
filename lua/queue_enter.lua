-- A shopper enters a queued sale's waiting room (idempotent per user).
-- KEYS[1] sale hash  KEYS[2] queue hash  KEYS[3] lottery (sorted set)  KEYS[4] arrivals (list)
-- KEYS[5] entrants (hash user -> "kind|position|entered_ms")  KEYS[6] attempts per account
-- KEYS[7] entrants per client IP  KEYS[8] entrants per device id
-- KEYS[9] account -> the device id it first entered with (or was refused with)
-- KEYS[10] per client IP: "n|<ip>" -> device ids it brought, "d|<ip>|<device>" -> 1 once seen
-- ARGV[1] user id  ARGV[2] lottery draw (a random integer, drawn by the caller)
-- ARGV[3] client IP  ARGV[4] device id ("" = none)  ARGV[5] attempts per account (0 = no limit)
-- ARGV[6] entrants per IP (0 = no limit)  ARGV[7] entrants per device (0 = no limit)
-- ARGV[8] queue opens at (ms)  ARGV[9] device ids per client IP (0 = no limit)
-- The device id is the client's choice, so the device limit also counts what a client cannot
-- change for free: an account keeps the first device id it presents (another one is refused,
-- so a refusal is not undone by a new header), and one address brings at most ARGV[9] ids.
-- Before the start (and before the draw) an entrant joins the lottery: its place is the rank
-- of its random draw, fixed when the draw freezes the lottery at the start. After it, the
-- entrant gets the next position in arrival order, after every lottery entrant.
-- Returns (flashsale/stores/scripts.py QueueEnter) {status, ...}, the status one of:
--   0 ENTERED {kind, position, entered_ms}
--   1 ALREADY_IN {kind, position, entered_ms}
--   2 ACCOUNT_LIMIT
--   3 IP_LIMIT
--   4 DEVICE_LIMIT
--   5 NOT_OPEN {opens_ms}
--   6 ENDED
--   7 SOLD_OUT
--   8 UNKNOWN_SALE
--   9 NOT_QUEUED: the sale is open, there is no queue to enter
local user = ARGV[1]
local s = redis.call('HMGET', KEYS[1], 'remaining', 'start_ms', 'end_ms', 'closed', 'mode')
if s[2] == false then return {8} end
if s[5] ~= 'queued' then return {9} end
local keep_until = tonumber(s[3]) + 86400000
local function keep(key) redis.call('PEXPIREAT', key, keep_until) end

local max_attempts = tonumber(ARGV[5])
if max_attempts > 0 then
  local n = redis.call('HINCRBY', KEYS[6], user, 1)
  keep(KEYS[6])
  if n > max_attempts then return {2} end
end
local seen = redis.call('HGET', KEYS[5], user)
if seen then
  local kind, pos, at = string.match(seen, '^(%a)|(%d+)|(%d+)$')
  return {1, kind, tonumber(pos), tonumber(at)}
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now < tonumber(ARGV[8]) then return {5, tonumber(ARGV[8])} end
if now >= tonumber(s[3]) or s[4] == '1' then return {6} end
if tonumber(s[1]) <= 0 then return {7} end

local ip, device = ARGV[3], ARGV[4]
local max_ip, max_device = tonumber(ARGV[6]), tonumber(ARGV[7])
if max_ip > 0 and tonumber(redis.call('HGET', KEYS[7], ip) or '0') >= max_ip then return {3} end
local counted = max_device > 0 and device ~= ''
local seen_here = 'd|' .. ip .. '|' .. device
local new_here = false
if counted then
  local bound = redis.call('HGET', KEYS[9], user)
  if bound and bound ~= device then return {4} end
  if not bound then
    redis.call('HSET', KEYS[9], user, device)
    keep(KEYS[9])
  end
  if tonumber(redis.call('HGET', KEYS[8], device) or '0') >= max_device then return {4} end
  local max_ids = tonumber(ARGV[9])
  new_here = redis.call('HEXISTS', KEYS[10], seen_here) == 0
  if max_ids > 0 and new_here
      and tonumber(redis.call('HGET', KEYS[10], 'n|' .. ip) or '0') >= max_ids then
    return {4}
  end
end
if max_ip > 0 then redis.call('HINCRBY', KEYS[7], ip, 1); keep(KEYS[7]) end
if counted then
  redis.call('HINCRBY', KEYS[8], device, 1)
  keep(KEYS[8])
  if new_here then
    redis.call('HSET', KEYS[10], seen_here, 1)
    redis.call('HINCRBY', KEYS[10], 'n|' .. ip, 1)
    keep(KEYS[10])
  end
end

local kind, pos
local drawn = redis.call('HGET', KEYS[2], 'drawn') == '1'
if not drawn and now < tonumber(s[2]) then
  kind, pos = 'L', 0
  redis.call('ZADD', KEYS[3], tonumber(ARGV[2]), user)
  keep(KEYS[3])
else
  if not drawn then
    redis.call('HSET', KEYS[2], 'drawn', 1, 'lottery', redis.call('ZCARD', KEYS[3]))
  end
  kind = 'F'
  redis.call('RPUSH', KEYS[4], user)
  keep(KEYS[4])
  pos = tonumber(redis.call('HGET', KEYS[2], 'lottery')) + redis.call('HINCRBY', KEYS[2], 'arrived', 1)
end
redis.call('HSET', KEYS[5], user, kind .. '|' .. pos .. '|' .. now)
redis.call('HINCRBY', KEYS[2], 'entered', 1)
keep(KEYS[5])
keep(KEYS[2])
return {0, kind, pos, now}

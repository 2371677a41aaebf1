-- The whole flash-sale reservation in one atomic step.
-- KEYS[1] sale hash   KEYS[2] users   KEYS[3] first order   KEYS[4] log   KEYS[5] log times
-- KEYS[6] idempotency KEYS[7] user rate limit (tokens)    KEYS[8] ip rate limit (tokens)
-- ARGV[1] user id  ARGV[2] quantity  ARGV[3] order id  ARGV[4] idempotency field ("" = none)
-- ARGV[5] body fingerprint  ARGV[6] user rate/s  ARGV[7] user burst  ARGV[8] ip rate/s
-- ARGV[9] ip burst  ARGV[#ARGV] (10th, or 11th after the optional flag) run id of this
-- server, as the caller's connection read it
-- ARGV[10] of 11, optional: "1" = the same attempt again, after units were moved into this
--          (home) bucket of a sale split into buckets (flashsale/flash/buckets.py): no
--          rate-limit token is taken twice for one attempt
-- Returns (flashsale/stores/scripts.py Reserve) {status, ...}, the status one of:
--   0 RESERVED {order_id, deadline_ms, remaining}
--   1 REPLAY {order_id, deadline_ms}
--   2 IDEMPOTENCY_MISMATCH
--   3 USER_RATE_LIMITED {retry_ms}
--   4 IP_RATE_LIMITED {retry_ms}
--   5 NOT_STARTED {start_ms}
--   6 ENDED
--   7 LIMIT_EXCEEDED {first order id}
--   8 SOLD_OUT
--   9 INSUFFICIENT {remaining}
--  10 UNKNOWN_SALE
--  11 RECOVERING: the sale was armed by another run of Redis, which may have lost writes
--     since; its counters wait for a re-arm
local user, qty, order_id, idem = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]

if idem ~= '' then
  local seen = redis.call('HGET', KEYS[6], idem)
  if seen then
    local sep1 = string.find(seen, '|', 1, true)
    local sep2 = string.find(seen, '|', sep1 + 1, true)
    if string.sub(seen, sep1 + 1, sep2 - 1) ~= ARGV[5] then
      return {2}
    end
    -- marked promised: this answer tells the shopper yes, so the gateway that made the
    -- reservation may no longer release it if its publish fails (lua/release.lua leaves
    -- it to the stranded sweeper). The write also lets WAIT cover the answer: WAIT waits
    -- for this connection's own last write, and the reservation may have been written
    -- through another connection (a retry is told 202 only for an order the replicas hold)
    local order = string.sub(seen, 1, sep1 - 1)
    redis.call('HSET', KEYS[6], 'p:' .. order, '1')
    return {1, order, string.sub(seen, sep2 + 1)}
  end
end

local armed = redis.call('HGET', KEYS[1], 'armed')
if armed ~= ARGV[#ARGV] then
  if armed == false and redis.call('EXISTS', KEYS[1]) == 0 then return {10} end
  return {11}
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function take(key, rate, burst)
  local b = redis.call('HMGET', key, 't', 'ts')
  local tokens, ts = tonumber(b[1]), tonumber(b[2])
  if tokens == nil then tokens, ts = burst, now end
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
  if tokens < 1 then return math.ceil((1 - tokens) * 1000 / rate), tokens end
  return 0, tokens - 1
end
if not (#ARGV == 11 and ARGV[10] == '1') then
  local u_rate, u_burst = tonumber(ARGV[6]), tonumber(ARGV[7])
  local i_rate, i_burst = tonumber(ARGV[8]), tonumber(ARGV[9])
  local u_wait, u_left = take(KEYS[7], u_rate, u_burst)
  if u_wait > 0 then return {3, u_wait} end
  local i_wait, i_left = take(KEYS[8], i_rate, i_burst)
  if i_wait > 0 then return {4, i_wait} end
  redis.call('HSET', KEYS[7], 't', u_left, 'ts', now)
  redis.call('PEXPIRE', KEYS[7], math.ceil(u_burst * 1000 / u_rate) + 1000)
  redis.call('HSET', KEYS[8], 't', i_left, 'ts', now)
  redis.call('PEXPIRE', KEYS[8], math.ceil(i_burst * 1000 / i_rate) + 1000)
end

local s = redis.call('HMGET', KEYS[1], 'remaining', 'limit', 'start_ms', 'end_ms', 'closed',
                     'window_ms', 'sku', 'product', 'price')
if s[1] == false then return {10} end
if now < tonumber(s[3]) then return {5, s[3]} end
if now >= tonumber(s[4]) or s[5] == '1' then return {6} end

local held = tonumber(redis.call('HGET', KEYS[2], user) or '0')
if held + qty > tonumber(s[2]) then
  -- this answer names the order the shopper already has: promised as a replay's is, while
  -- its publish may still fail (once a consumer claimed it, no release can take it back)
  local first = redis.call('HGET', KEYS[3], user)
  if first and redis.call('HEXISTS', KEYS[4], first) == 1 then
    redis.call('HSET', KEYS[6], 'p:' .. first, '1')
  end
  return {7, first or ''}
end
local remaining = tonumber(s[1])
if remaining <= 0 then return {8} end
if remaining < qty then return {9, remaining} end

remaining = redis.call('HINCRBY', KEYS[1], 'remaining', -qty)
redis.call('HINCRBY', KEYS[2], user, qty)
redis.call('HSETNX', KEYS[3], user, order_id)
local deadline = now + tonumber(s[6])
redis.call('HSET', KEYS[4], order_id,
  user .. '|' .. s[7] .. '|' .. s[8] .. '|' .. qty .. '|' .. s[9] .. '|' .. deadline .. '|' .. now)
redis.call('ZADD', KEYS[5], now, order_id)
if idem ~= '' then
  redis.call('HSET', KEYS[6], idem, order_id .. '|' .. ARGV[5] .. '|' .. deadline)
end
return {0, order_id, deadline, remaining}

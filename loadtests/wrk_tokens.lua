-- wrk script for the benchmark (loadtests/loadgen.py:run_wrk builds the command line).
-- args: tokens_file method body max_requests_per_thread threads
-- Every request carries the next bearer token of this thread's share of the file
-- (thread i takes lines i+1, i+1+threads, ...), so users stay distinct across threads.
-- Counts every status and stops a thread after max_requests_per_thread responses.
-- done() prints one line "WRKJSON {...}" that loadgen.py parses.

local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  local all = {}
  local path = args[1]
  if path and path ~= "" then
    for line in io.lines(path) do
      if #line > 0 then table.insert(all, line) end
    end
  end
  wrk.method = args[2] or "GET"
  if args[3] and args[3] ~= "" then
    wrk.body = args[3]
    wrk.headers["Content-Type"] = "application/json"
  end
  max_requests = tonumber(args[4]) or 1000000
  local nthreads = tonumber(args[5]) or 1
  mine = {}
  for i = id + 1, #all, nthreads do table.insert(mine, all[i]) end
  if #mine == 0 then mine = all end
  idx = 0
  responses = 0
  statuses = {}
end

function request()
  if #mine > 0 then
    idx = idx % #mine + 1
    wrk.headers["Authorization"] = "Bearer " .. mine[idx]
  end
  return wrk.format()
end

function response(status, headers, body)
  responses = responses + 1
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
  if responses >= max_requests then wrk.thread:stop() end
end

function done(summary, latency, requests)
  local agg = {}
  for _, t in ipairs(threads) do
    local st = t:get("statuses")
    if st then
      for k, v in pairs(st) do agg[k] = (agg[k] or 0) + v end
    end
  end
  local parts = {}
  for k, v in pairs(agg) do table.insert(parts, string.format('"%s": %d', k, v)) end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"connect": %d, "read": %d, "write": %d, "timeout": %d, "status_errors": %d, ' ..
    '"statuses": {%s}}\n',
    summary.requests, summary.duration, math.floor(latency:percentile(50)),
    math.floor(latency:percentile(99)), e.connect, e.read, e.write, e.timeout, e.status,
    table.concat(parts, ", ")))
end

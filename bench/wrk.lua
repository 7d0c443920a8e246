-- The wrk script of bench/run (see bench/README.md); bench/run passes everything after `--`:
--   get  EXPECTED PATH...        GET the paths in turn
--   post EXPECTED PATH BODY      POST BODY, "@N@" replaced by a value unique to each request
-- EXPECTED is the status every response should have; the others are counted as unexpected, and
-- 404s apart. done() prints one BENCH_RESULT line of JSON that bench/run reads.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_no", #threads)
end

function init(args)
  mode, expected = args[1], tonumber(args[2])
  items = {}
  for i = 3, #args do items[#items + 1] = args[i] end
  sent, unexpected, not_found = 0, 0, 0
  json_headers = {["Content-Type"] = "application/json"}
end

function request()
  sent = sent + 1
  if mode == "post" then
    local body = string.gsub(items[2], "@N@", thread_no .. "-" .. sent)
    return wrk.format("POST", items[1], json_headers, body)
  end
  return wrk.format("GET", items[(sent - 1) % #items + 1])
end

function response(status, headers, body)
  if status ~= expected then unexpected = unexpected + 1 end
  if status == 404 then not_found = not_found + 1 end
end

function done(summary, latency, requests)
  local unexpected_total, not_found_total = 0, 0
  for _, thread in ipairs(threads) do
    unexpected_total = unexpected_total + thread:get("unexpected")
    not_found_total = not_found_total + thread:get("not_found")
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, ' ..
    '"socket_errors": %d, "timeouts": %d, "unexpected": %d, "not_found": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    e.connect + e.read + e.write, e.timeout, unexpected_total, not_found_total))
end

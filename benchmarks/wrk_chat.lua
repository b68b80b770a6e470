-- POST a small chat completion; the first script argument, when given, is the session id,
-- and a second argument "stream" asks for an SSE stream of 20 chunks instead.
-- Prints one JSON line with exact percentiles for the benchmark scripts to read.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
-- LiteLLM's proxy refuses calls without its key; every other target ignores or forwards it.
wrk.headers["Authorization"] = "Bearer sk-llmsc-bench"
wrk.body = '{"model":"fake-model","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'

function init(args)
  if args[1] ~= nil then
    wrk.headers["x-session-id"] = args[1]
  end
  if args[2] == "stream" then
    wrk.body = '{"model":"fake-model","messages":[{"role":"user","content":"Say hello."}],"max_tokens":20,"stream":true}'
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests":%d,"duration_us":%d,"errors":%d,"non_2xx":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end

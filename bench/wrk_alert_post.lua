-- wrk script for scripts/bench-webhook-wrk.sh: POSTs the Alertmanager
-- payload in $ALERT with its groupKey made unique per request (thread and
-- request number), so every request is a new idempotency key and commits a
-- new outbox row, as distinct alerts do.
local f = assert(io.open(os.getenv("ALERT"), "r"))
local body = f:read("*a")
f:close()
local n = 0
made = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function setup(thread)
  made = made + 1
  thread:set("tid", made)
end

request = function()
  n = n + 1
  local b = body:gsub('"groupKey": "', '"groupKey": "' .. (tid or 0) .. "-" .. n .. "-", 1)
  return wrk.format(nil, nil, nil, b)
end

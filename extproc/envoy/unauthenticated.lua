-- Callers without a valid credential, rate-limited per source address before any
-- authentication work (JWT signature, API-key hash).
--
-- First in the chain. A request from an address whose bucket is empty is refused
-- at once with 429; every 401 the authentication filters answer takes one token
-- from the bucket of the address it came from. A caller that authenticates never
-- spends a token, so only addresses that keep failing are slowed down.
-- The generator prepends RATE (tokens per second), BURST (bucket size) and RETRY_AFTER.
--
-- One table per Envoy worker thread (each has its own Lua state): the budget is per
-- thread. It holds at most MAX_ADDRESSES entries and starts over when full, so a
-- spread of source addresses cannot grow it without bound.

local MAX_ADDRESSES = 100000
local buckets, count = {}, 0

-- "203.0.113.7:51234" or "[2001:db8::1]:51234" -> the address without the port.
local function source(handle)
  local remote = handle:streamInfo():downstreamRemoteAddress()
  return remote:match("^%[(.*)%]:%d+$") or remote:match("^(.*):%d+$") or remote
end

local function level(bucket, now)
  local tokens = math.min(BURST, bucket.tokens + (now - bucket.at) * RATE)
  bucket.tokens, bucket.at = tokens, now
  return tokens
end

function envoy_on_request(handle)
  local bucket = buckets[source(handle)]
  if bucket ~= nil and level(bucket, os.time()) < 1 then
    -- The body is replaced by local_reply_config's JSON error (code `rate_limited`).
    handle:respond({[":status"] = "429", ["retry-after"] = RETRY_AFTER}, "")
  end
end

function envoy_on_response(handle)
  if handle:headers():get(":status") ~= "401" then
    return
  end
  local address, now = source(handle), os.time()
  local bucket = buckets[address]
  if bucket == nil then
    if count >= MAX_ADDRESSES then
      buckets, count = {}, 0
    end
    bucket = {tokens = BURST, at = now}
    buckets[address], count = bucket, count + 1
  end
  bucket.tokens = level(bucket, now) - 1
end

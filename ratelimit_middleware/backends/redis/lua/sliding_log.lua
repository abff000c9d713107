-- Sliding window log (algorithms/sliding_log.py). One ZSET per key: score = the request's time, member =
-- '<cumulative cost, 16 digits>:<cost>', one member per request whatever its cost. The cumulative costs
-- (zero-padded, so equal times still sort in order) make every count two lookups, not a sum: the units in
-- the window are the last member's cumulative cost minus the cumulative cost before the first live one.
-- A request at t counts in [t, t + window): live entries have time > now - window. Expired entries are
-- trimmed on each write; the key expires one window after its newest entry.

local function entry(member)
  local cum, cost = string.match(member, '^([^:]+):(.+)$')
  return tonumber(cum), tonumber(cost)
end

-- The last entry's cumulative cost and time, or false for a key never seen (or expired).
local function read_state(key)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if #last == 0 then return false end
  return { total = entry(last[1]), last_time = tonumber(last[2]) }
end

-- The cumulative cost before the first live entry (all of it when none is live).
local function before_live(key, state, cutoff)
  local first = redis.call('ZRANGEBYSCORE', key, '(' .. fmt(cutoff), '+inf', 'LIMIT', 0, 1)
  if #first == 0 then return state.total end
  local cum, cost = entry(first[1])
  return cum - cost
end

local function evaluate(key, state, limit, window, now, cost)
  if not state then
    if cost ~= 0 then return 1, limit - cost, 0, window end
    return 1, limit - cost, 0, 0
  end
  local cutoff = now - window
  local used_units = state.total - before_live(key, state, cutoff)
  local last_expiry = state.last_time + window - now
  if last_expiry < 0 then last_expiry = 0 end
  if used_units + cost <= limit then
    local after = used_units + cost
    if cost ~= 0 then return 1, limit - after, 0, window end
    return 1, limit - after, 0, last_expiry
  end
  -- Entries up to and including rank k must leave the window: the first live one whose cumulative cost
  -- reaches total + cost - limit. Binary search by rank (cumulative costs grow with rank).
  local target = state.total + cost - limit
  local lo = redis.call('ZCOUNT', key, '-inf', fmt(cutoff))
  local hi = redis.call('ZCARD', key) - 1
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    local cum = entry(redis.call('ZRANGE', key, mid, mid)[1])
    if cum >= target then hi = mid else lo = mid + 1 end
  end
  local found = redis.call('ZRANGE', key, lo, lo, 'WITHSCORES')
  return 0, 0, tonumber(found[2]) + window - now, last_expiry
end

local function commit(key, state, limit, window, now, cost, pad)
  local total, at = 0, now
  if state then
    total = state.total
    -- Never log before the newest entry (Redis' clock stepped back): the log stays in time order.
    if state.last_time > now then at = state.last_time end
    redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now - window))
  end
  redis.call('ZADD', key, fmt(at), string.format('%016.0f:%s', total + cost, fmt(cost)))
  redis.call('PEXPIRE', key, ttl_ms(at + window - now, pad))
end

local function used(key, state, limit, window, now)
  if not state then return 0 end
  return state.total - before_live(key, state, now - window)
end

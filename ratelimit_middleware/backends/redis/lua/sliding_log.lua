-- Sliding window log (algorithms/sliding_log.py). One ZSET per key, one member per request whatever its
-- cost: score = the request's time, member = '<cumulative cost before it>:<cost>', the cumulative cost
-- written with its digit count first ('C123' for 123: 'A'..'P' for 1..16 digits), so that entries of one
-- instant still sort in log order, in a few bytes. The cumulative costs make every count two lookups, not a
-- sum: the units in the window are the last entry's cumulative cost and cost, minus the cumulative cost
-- before the first live entry. A request at t counts in [t, t + window): live entries have time > now -
-- window. Expired entries are trimmed on writes; the key expires one window after its newest entry.
-- Every entry costs at least 1 (as in memory): a settlement that empties entries removes them (see adjust),
-- so the log holds only what it counts, and cumulative costs grow strictly: no two members are alike.
-- Doubles hold every integer up to 2^53 (config.MAX_AMOUNT) and no further, as memory's float64 pairs: before
-- a cumulative cost would pass it, the expired entries go and the rest count from the first live one
-- (rebase); sums that may pass it are compared as differences; an overage stops at 2^53 units in the window.

local MAX_AMOUNT = 2 ^ 53

local function entry(member)
  local before, cost = string.match(member, '^.(%d+):(%d+)')
  return tonumber(before), tonumber(cost)
end

local function member(before, cost)
  local digits = string.format('%d', before)
  return string.format('%c%s:%d', 64 + #digits, digits, cost)
end

-- Append an entry (score `time`, `cost` after the cumulative cost `before`) to `new`, ZADD's arguments,
-- unless it costs 0 (a settlement emptied it; or a log written by a version that kept such entries): the
-- cumulative cost after it.
local function put(new, time, before, cost)
  if cost == 0 then return before end
  new[#new + 1] = time
  new[#new + 1] = member(before, cost)
  return before + cost
end

-- The log's cumulative cost and newest time, and its oldest entry (time, and cumulative cost before it: the
-- base of the count while nothing has expired); false for a key never seen (or expired).
local function read_state(key)
  local last = redis.call('ZRANGE', key, '-1', '-1', 'WITHSCORES')
  if #last == 0 then return false end
  local before, cost = entry(last[1])
  local first = redis.call('ZRANGE', key, '0', '0', 'WITHSCORES')
  return {
    total = before + cost,
    last_time = tonumber(last[2]),
    first_before = (entry(first[1])),
    first_time = tonumber(first[2]),
  }
end

-- The cumulative cost before the first live entry (all of it when none is live).
local function before_live(key, state, cutoff)
  if state.first_time > cutoff then return state.first_before end -- nothing has expired
  local first = redis.call('ZRANGEBYSCORE', key, '(' .. fmt(cutoff), '+inf', 'LIMIT', '0', '1')
  if #first == 0 then return state.total end
  return (entry(first[1]))
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
  if used_units <= limit - cost then
    local after = used_units + cost
    if cost ~= 0 then return 1, limit - after, 0, window end
    return 1, limit - after, 0, last_expiry
  end
  -- Entries up to and including rank k must leave the window: the first live one whose cumulative cost
  -- (with its own) reaches total + cost - limit. Binary search by rank (cumulative costs grow with rank).
  local target = state.total - (limit - cost)
  local lo = redis.call('ZCOUNT', key, '-inf', fmt(cutoff))
  local hi = redis.call('ZCARD', key) - 1
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    local before, mid_cost = entry(redis.call('ZRANGE', key, mid, mid)[1])
    if before + mid_cost >= target then hi = mid else lo = mid + 1 end
  end
  -- Until that entry has left the window by the window's own test (live while time > now - window).
  local time = tonumber(redis.call('ZRANGE', key, lo, lo, 'WITHSCORES')[2])
  local wait = wait_until(now, time + window - now, function(later) return later - window >= time end)
  return 0, 0, wait, last_expiry
end

-- Run `command` on key with `values`, a thousand at a time (Lua's stack limits unpack).
local function chunked(command, key, values, step)
  for i = 1, #values, step do
    redis.call(command, key, unpack(values, i, math.min(i + step - 1, #values)))
  end
end

-- Cut every expired entry and count the cumulative costs from the first live one (sliding_log.py's
-- _rebase); the state after.
local function rebase(key, now, window)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now - window))
  local entries = redis.call('ZRANGE', key, '0', '-1', 'WITHSCORES')
  if #entries == 0 then return false end
  local base, old, new = entry(entries[1]), {}, {}
  for i = 1, #entries, 2 do
    local before, cost = entry(entries[i])
    old[#old + 1] = entries[i]
    put(new, entries[i + 1], before - base, cost)
  end
  chunked('ZREM', key, old, 1000)
  chunked('ZADD', key, new, 1000)
  return read_state(key)
end

-- The time a request at now is logged at (the receipt of a reservation names it): never before the newest
-- entry (Redis' clock stepped back), so that the log stays in time order.
local function charged_at(state, window, now)
  if state and state.last_time > now then return state.last_time end
  return now
end

local function commit(key, state, limit, window, now, cost, pad)
  if state and state.total > MAX_AMOUNT - cost then state = rebase(key, now, window) end
  local at, total = charged_at(state, window, now), 0
  if state then
    total = state.total
    if state.first_time <= now - window then
      redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now - window))
    end
  end
  redis.call('ZADD', key, fmt(at), member(total, cost))
  redis.call('PEXPIRE', key, ttl_ms(at + window - now, pad))
end

-- The entries logged at `at` settle as one (they expire together): an overage goes on the last of them (or
-- on a new entry at `at` if there is none), a refund takes from the last ones first, never below a cost of
-- 0, and the entries it empties go (a reservation settled at 0 or cancelled leaves nothing, however many
-- there are in the window); every later entry's cumulative cost moves by the change. The key then expires
-- one window after its newest remaining entry (Redis deletes it with its last). Once `at` has left the
-- window, nothing changes.
local function adjust(key, state, limit, window, now, at, charged, delta, pad)
  if at <= now - window then return end
  if delta > 0 then -- an overage: counted up to MAX_AMOUNT units in the window
    local room = MAX_AMOUNT
    if state then room = MAX_AMOUNT - (state.total - before_live(key, state, now - window)) end
    if delta > room then delta = room end
    if delta == 0 then return end
    if state and state.total > MAX_AMOUNT - delta then rebase(key, now, window) end -- `at` is live: it stays
  end
  local stamp = fmt(at)
  local run = redis.call('ZRANGEBYSCORE', key, stamp, stamp)
  local later = redis.call('ZRANGEBYSCORE', key, '(' .. stamp, '+inf', 'WITHSCORES')
  local base, costs = 0, {}
  if #run == 0 then
    if delta <= 0 then return end
    local previous = redis.call('ZREVRANGEBYSCORE', key, '(' .. stamp, '-inf', 'LIMIT', '0', '1')
    if #previous > 0 then
      local before, cost = entry(previous[1])
      base = before + cost
    elseif #later > 0 then
      base = entry(later[1])
    end
    costs[1] = delta
  else
    base = entry(run[1])
    for i = 1, #run do
      local _, cost = entry(run[i])
      costs[i] = cost
    end
    if delta >= 0 then
      costs[#costs] = costs[#costs] + delta
    else
      local owed = -delta
      for i = #costs, 1, -1 do
        local taken = math.min(costs[i], owed)
        costs[i] = costs[i] - taken
        owed = owed - taken
        if owed == 0 then break end
      end
    end
  end
  -- Remove every entry to rewrite before adding any back, so that a new member never meets an old one.
  local old, new, before = {}, {}, base
  for i = 1, #run do old[#old + 1] = run[i] end
  for i = 1, #costs do before = put(new, stamp, before, costs[i]) end
  for i = 1, #later, 2 do
    local _, cost = entry(later[i])
    old[#old + 1] = later[i]
    before = put(new, later[i + 1], before, cost)
  end
  chunked('ZREM', key, old, 1000)
  chunked('ZADD', key, new, 1000)
  local last = redis.call('ZRANGE', key, '-1', '-1', 'WITHSCORES')
  if #last > 0 then redis.call('PEXPIRE', key, ttl_ms(tonumber(last[2]) + window - now, pad)) end
end

-- Undo a charge of `cost` made at `at` that was never granted (a decision spread over cluster slots that
-- another slot denied): an adjustment by -cost, whose emptied entries go, as if never logged.
local function refund(key, state, limit, window, now, at, cost, pad)
  adjust(key, state, limit, window, now, at, cost, -cost, pad)
end

local function used(key, state, limit, window, now)
  if not state then return 0 end
  return state.total - before_live(key, state, now - window)
end

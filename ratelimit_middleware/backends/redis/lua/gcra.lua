-- GCRA (algorithms/gcra.py): one string per key, the theoretical arrival time tat (the time the bucket is
-- full again). The key expires at tat, when it is indistinguishable from no key.

local SLACK = 1e-9

local function read_state(key)
  local value = redis.call('GET', key)
  if not value then return false end
  return tonumber(value)
end

local function arrival(state, now)
  if not state or state < now then return now end
  return state
end

local function evaluate(key, state, limit, window, now, cost)
  local interval = window / limit
  local tat = arrival(state, now)
  local debt = tat + cost * interval - now
  if debt <= window + window * SLACK then
    local remaining = trunc((window - debt) / interval + SLACK)
    if remaining < 0 then remaining = 0 end
    return 1, remaining, 0, debt
  end
  return 0, 0, debt - window, tat - now
end

local function commit(key, state, limit, window, now, cost, pad)
  local tat = arrival(state, now) + cost * (window / limit)
  redis.call('SET', key, fmt(tat), 'PX', ttl_ms(tat - now, pad))
end

-- An overage is charged as if at `at` (what has drained since stays drained); a refund gives back at most
-- what has not drained yet (a bucket is never fuller than full).
local function adjust(key, state, limit, window, now, at, delta, pad)
  local tat
  if delta >= 0 then
    tat = arrival(state, at) + delta * (window / limit)
    if tat <= now then return end
  else
    if not state or state <= now then return end
    tat = state + delta * (window / limit)
    if tat <= now then
      redis.call('DEL', key)
      return
    end
  end
  redis.call('SET', key, fmt(tat), 'PX', ttl_ms(tat - now, pad))
end

-- Undo a charge of `cost` made at `at` that was never granted (a decision spread over cluster slots that
-- another slot denied): an adjustment by -cost.
local function refund(key, state, limit, window, now, at, cost, pad)
  adjust(key, state, limit, window, now, at, -cost, pad)
end

local function used(key, state, limit, window, now)
  if not state or state <= now then return 0 end
  return math.ceil((state - now) / (window / limit) - SLACK)
end

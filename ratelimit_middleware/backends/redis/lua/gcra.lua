-- GCRA (algorithms/gcra.py): one string per key, the theoretical arrival time tat (the time the bucket is
-- full again). The key expires at tat, when it is indistinguishable from no key.

local SLACK = 1e-9
local SUMS = 1024

-- The most debt a request may leave at now (algorithms/gcra.py) is ceiling + spare(now): a slack relative to
-- the window, and the rounding of up to SUMS sums at the clock's magnitude, at most half an interval.
local function ceiling_of(limit, window)
  return window + window * SLACK, math.min(limit, SUMS) * 2 ^ -52, (window / limit) / 2
end

local function spare_at(now, drift, cap)
  local spare = now * drift
  if spare > cap then return cap end
  return spare
end

local function read_state(key)
  local value = redis.call('GET', key)
  if not value then return false end
  return tonumber(value)
end

local function arrival(state, now)
  if not state or state < now then return now end
  return state
end

-- The most units one more request could take at now once the bucket ends at after, by admission's own
-- expression (the quotient alone is off by one either way when the sums round).
local function units_left(after, now, debt, interval, bound)
  local remaining = trunc((bound - debt) / interval)
  if remaining > 0 and after + remaining * interval - now > bound then return remaining - 1 end
  if after + (remaining + 1) * interval - now <= bound then return remaining + 1 end
  return remaining
end

local function evaluate(key, state, limit, window, now, cost)
  local interval = window / limit
  local ceiling, drift, cap = ceiling_of(limit, window)
  local tat = arrival(state, now)
  local debt = tat + cost * interval - now
  local spare = now * drift -- spare_at, inline on the path of every decision
  if spare > cap then spare = cap end
  local bound = ceiling + spare
  if debt <= bound then
    return 1, units_left(tat + cost * interval, now, debt, interval, bound), 0, debt
  end
  local wait = wait_until(now, debt - window, function(later)
    return arrival(tat, later) + cost * interval - later <= ceiling + spare_at(later, drift, cap)
  end)
  return 0, 0, wait, tat - now
end

local function commit(key, state, limit, window, now, cost, pad)
  local tat = arrival(state, now) + cost * (window / limit)
  redis.call('SET', key, fmt(tat), 'PX', ttl_ms(tat - now, pad))
end

-- Every charge is made at now, behind the key's arrival time.
local function charged_at(state, window, now)
  return now
end

-- An overage is charged as if at `at`, behind the charge itself (`at + charged * interval` at the earliest, also
-- once its key has drained and gone: a key drained but not yet expired is the same as one gone, as in
-- memory, which sweeps it at times), and what has drained since stays drained, saturating one window ahead (a
-- bucket is never more than empty), a window ahead of the charge's time at least: Redis' clock may have
-- stepped back since, and time never runs backwards for a key (memory's clock never does). A refund gives back
-- only what of the charge cannot have drained yet: its units drain one per interval from `at` at the
-- earliest, and the end of the bucket may be later charges'.
local function adjust(key, state, limit, window, now, at, charged, delta, pad)
  local interval = window / limit
  local tat
  if delta >= 0 then
    tat = at + charged * interval
    if state and state > tat and state > now then tat = state end
    tat = tat + delta * interval
    local full = now + window
    if at > now then full = at + window end
    if tat > full then
      if not state or state < full then tat = full else tat = state end
    end
    if tat <= now then return end
  else
    if not state or state <= now then return end
    local give = -delta * interval
    if now > at then
      give = give - (now - at)
      if give <= 0 then return end
    end
    tat = state - give
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
  adjust(key, state, limit, window, now, at, cost, -cost, pad)
end

-- Less the slack admission grants, as whole units.
local function used(key, state, limit, window, now)
  if not state or state <= now then return 0 end
  local ceiling, drift, cap = ceiling_of(limit, window)
  local spare = spare_at(now, drift, cap) + (ceiling - window)
  local units = math.ceil((state - now - spare) / (window / limit))
  if units > 0 then return units end
  return 0
end

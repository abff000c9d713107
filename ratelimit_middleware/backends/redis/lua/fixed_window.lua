-- Fixed window (algorithms/fixed_window.py): a counter per aligned window [k * window, (k + 1) * window).
-- One string per key, '<k>:<used>'; the key expires when its window ends.

local function read_state(key)
  local value = redis.call('GET', key)
  if not value then return false end
  local k, units = string.match(value, '^([^:]+):(.+)$')
  return { k = tonumber(k), used = tonumber(units) }
end

-- The current window number and the units used in it. A stored window later than now (Redis' clock stepped
-- back) stays current: time never runs backwards for a key.
local function current(state, window, now)
  local k = floordiv(now, window)
  if not state or state.k < k then return k, 0 end
  return state.k, state.used
end

local function evaluate(key, state, limit, window, now, cost)
  local k, units = current(state, window, now)
  local to_next = (k + 1) * window - now
  if floordiv(now + to_next, window) <= k then -- the rounded boundary still falls in window k
    to_next = wait_until(now, to_next, function(later) return floordiv(later, window) > k end)
  end
  if units <= limit - cost then
    local after = units + cost
    if after ~= 0 then return 1, limit - after, 0, to_next end
    return 1, limit - after, 0, 0
  end
  return 0, 0, to_next, to_next
end

-- Counts the request in the key's current window.
local function commit(key, state, limit, window, now, cost, pad)
  local k, units = current(state, window, now)
  redis.call('SET', key, string.format('%d:%d', k, units + cost), 'PX', ttl_ms((k + 1) * window - now, pad))
end

-- A charge at now counts in the key's current window: at its start when that window is later than now's
-- (Redis' clock stepped back), where the settlement finds it (see driver.lua).
local function charged_at(state, window, now)
  local k = current(state, window, now)
  if k > floordiv(now, window) then return window_start(k, window) end
  return now
end

-- A charge made at `at` moves by delta while its window is the key's current one (never below 0 nor above
-- the limit): a stored window later than now stays current, as in evaluate, so a settlement made while
-- Redis' clock is behind the charge's window still lands. Once that window is over, nothing changes.
local function adjust(key, state, limit, window, now, at, charged, delta, pad)
  local k, units = current(state, window, now)
  if floordiv(at, window) ~= k then return end
  units = clamp(units + delta, limit)
  if units == 0 then -- the same as no state: leave none
    if state then redis.call('DEL', key) end
    return
  end
  redis.call('SET', key, string.format('%d:%d', k, units), 'PX', ttl_ms((k + 1) * window - now, pad))
end

-- Undo a charge of `cost` made at `at` that was never granted (a decision spread over cluster slots that
-- another slot denied): an adjustment by -cost.
local function refund(key, state, limit, window, now, at, cost, pad)
  adjust(key, state, limit, window, now, at, cost, -cost, pad)
end

local function used(key, state, limit, window, now)
  local _, units = current(state, window, now)
  return units
end

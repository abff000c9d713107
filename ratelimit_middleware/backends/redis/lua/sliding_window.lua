-- Sliding window counter (algorithms/sliding_window.py): the current aligned window's count plus a share
-- of the previous one. One string per key, '<k>:<previous>:<current>'; the key expires when window k + 2
-- begins, when it no longer counts (two windows at most).

local function read_state(key)
  local value = redis.call('GET', key)
  if not value then return false end
  local k, previous, units = string.match(value, '^([^:]+):([^:]+):(.+)$')
  return { k = tonumber(k), previous = tonumber(previous), current = tonumber(units) }
end

-- (k, start, now, previous, current) as seen at now. A stored window later than now (Redis' clock stepped
-- back) stays current, from its start (now is raised to it): time never runs backwards for a key.
local function counts(state, window, now)
  local k = floordiv(now, window)
  if state and state.k > k then
    k = state.k
    now = window_start(k, window)
  end
  local start = k * window
  if not state then return k, start, now, 0, 0 end
  if state.k == k then return k, start, now, state.previous, state.current end
  if state.k == k - 1 then return k, start, now, state.current, 0 end
  return k, start, now, 0, 0
end

-- The earliest time a request of cost fits in the window starting at start, or later. A moment in the next
-- window may round to this one's end at large counts: admission also needs units <= limit - cost.
local function fits_from(start, window, limit, previous, units, cost)
  local room = limit - units - cost
  if room >= 0 then
    if previous > room then return start + window * (1 - room / previous) end
    return start
  end
  return start + window * (2 - (limit - cost) / units)
end

local function evaluate(key, state, limit, window, now, cost)
  local k, start, at, previous, units = counts(state, window, now)
  local tolerance = window * 1e-9
  local fits_at = fits_from(start, window, limit, previous, units, cost)
  if units <= limit - cost and at >= fits_at - tolerance then
    local estimate = previous * (1 - (at - start) / window) + (units + cost) -- as Python: one rounding
    local remaining = trunc(limit - estimate + 1e-9)
    if remaining < 0 then remaining = 0 end
    return 1, remaining, 0, start + 2 * window - at
  end
  local reset
  if units ~= 0 then reset = start + 2 * window - at else reset = start + window - at end
  -- A retry may fall in the next window, where fits_at is computed in another form: test it there.
  local wait = wait_until(at, fits_at - at, function(later)
    local _, later_start, later_at, later_previous, later_units = counts(state, window, later)
    local later_fits_at = fits_from(later_start, window, limit, later_previous, later_units, cost)
    return later_units <= limit - cost and later_at >= later_fits_at - tolerance
  end)
  return 0, 0, wait, reset
end

-- Counts the request in the key's current window.
local function commit(key, state, limit, window, now, cost, pad)
  local k, start, _, previous, units = counts(state, window, now)
  local value = string.format('%d:%d:%d', k, previous, units + cost)
  redis.call('SET', key, value, 'PX', ttl_ms(start + 2 * window - now, pad))
end

-- A charge at now counts in the key's current window: at its start when that window is later than now's
-- (Redis' clock stepped back), where the settlement finds it (see driver.lua).
local function charged_at(state, window, now)
  local _, _, at = counts(state, window, now)
  return at
end

-- A charge made at `at` moves by delta in the window it was counted in, current or previous (never below 0
-- nor above the limit); once it no longer counts, nothing changes.
local function adjust(key, state, limit, window, now, at, charged, delta, pad)
  local k, start, _, previous, units = counts(state, window, now)
  local charged_in = floordiv(at, window)
  if charged_in == k then
    units = clamp(units + delta, limit)
  elseif charged_in == k - 1 then
    previous = clamp(previous + delta, limit)
  else
    return
  end
  if previous == 0 and units == 0 then -- the same as no state: leave none
    if state then redis.call('DEL', key) end
    return
  end
  local value = string.format('%d:%d:%d', k, previous, units)
  redis.call('SET', key, value, 'PX', ttl_ms(start + 2 * window - now, pad))
end

-- Undo a charge of `cost` made at `at` that was never granted (a decision spread over cluster slots that
-- another slot denied): an adjustment by -cost.
local function refund(key, state, limit, window, now, at, cost, pad)
  adjust(key, state, limit, window, now, at, cost, -cost, pad)
end

local function used(key, state, limit, window, now)
  local k, start, at, previous, units = counts(state, window, now)
  local share = previous * (1 - (at - start) / window)
  if share <= 0 then return units end
  local part = math.ceil(share - 1e-9) -- whole units, never more than the limit (an overage may pass it)
  if part > limit - units then return limit end
  return units + part
end

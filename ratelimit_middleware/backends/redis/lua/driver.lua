-- The modes of every script, appended to its algorithm. KEYS holds one key per rule; ARGV is
--   mode ('decide', 'reserve', 'adjust', 'refund', 'renew' or 'used'), now ('' = Redis TIME), ttl_pad_ms,
--   at ('adjust' and 'refund': when the charge was made), lease (seconds a concurrency slot is held unless
--   renewed), lease id (the reservation's, naming its leases), then per rule: limit, window, amount (its cost
--   for 'decide', 'reserve', 'refund' and 'renew', its change for 'adjust'). A rule with window 0 is a
--   concurrency limit (concurrency.lua's leases).
-- An algorithm defines read_state(key), evaluate(key, state, limit, window, now, cost) returning
-- (allowed 1/0, remaining, retry_after, reset_after), commit(key, state, limit, window, now, cost, pad),
-- adjust(key, state, limit, window, now, at, delta, pad), refund(key, state, limit, window, now, at, cost,
-- pad) and used(key, state, limit, window, now).

local now
if ARGV[2] == '' then
  local time = redis.call('TIME')
  now = tonumber(time[1]) + tonumber(time[2]) / 1000000
else
  now = tonumber(ARGV[2])
end
local pad = tonumber(ARGV[3])
local lease = tonumber(ARGV[5])
local lease_id = ARGV[6]

local limits, windows, amounts = {}, {}, {}
for i = 1, #KEYS do
  limits[i], windows[i], amounts[i] = tonumber(ARGV[4 + 3 * i]), tonumber(ARGV[5 + 3 * i]), tonumber(ARGV[6 + 3 * i])
end

if ARGV[1] == 'used' then
  if windows[1] == 0 then return lease_used(KEYS[1], now) end
  return used(KEYS[1], read_state(KEYS[1]), limits[1], windows[1], now)
end

-- Keep a reservation's leases (the keys of its concurrency rules only): the number of leases still held.
if ARGV[1] == 'renew' then
  local held = 0
  for i = 1, #KEYS do held = held + lease_renew(KEYS[i], lease_id, amounts[i], now, pad, lease) end
  return held
end

-- Settle a charge made at `at` (by 'reserve', whose reply ends with that time): 'adjust' moves each rule by
-- its delta (token settlements; a concurrency rule's is minus its slots, given back), 'refund' takes back
-- each rule's cost (a charge that was never granted).
if ARGV[1] == 'adjust' or ARGV[1] == 'refund' then
  local settle = adjust
  if ARGV[1] == 'refund' then settle = refund end
  local at = tonumber(ARGV[4])
  for i = 1, #KEYS do
    if amounts[i] ~= 0 and windows[i] == 0 then
      lease_release(KEYS[i], lease_id, math.abs(amounts[i]))
    elseif amounts[i] ~= 0 then settle(KEYS[i], read_state(KEYS[i]), limits[i], windows[i], now, at, amounts[i], pad) end
  end
  return fmt(now)
end

-- Check every rule, write only if all allow. The reply: allowed, remaining, retry_after, reset_after per
-- rule; for 'reserve', then the time of the charge (which 'adjust' and 'refund' take).
local states, reply, all_allow = {}, {}, true
for i = 1, #KEYS do
  local state, allowed, remaining, retry_after, reset_after
  if windows[i] == 0 then
    state = lease_read(KEYS[i], now)
    allowed, remaining, retry_after, reset_after = lease_evaluate(state, limits[i], amounts[i])
  else
    state = read_state(KEYS[i])
    allowed, remaining, retry_after, reset_after = evaluate(KEYS[i], state, limits[i], windows[i], now, amounts[i])
  end
  states[i] = state
  if allowed == 0 then all_allow = false end
  reply[4 * i - 3] = allowed
  reply[4 * i - 2] = remaining
  reply[4 * i - 1] = fmt(retry_after)
  reply[4 * i] = fmt(reset_after)
end
if all_allow then
  for i = 1, #KEYS do
    if amounts[i] > 0 and windows[i] == 0 then
      lease_take(KEYS[i], lease_id, amounts[i], now, pad, lease)
    elseif amounts[i] > 0 then commit(KEYS[i], states[i], limits[i], windows[i], now, amounts[i], pad) end
  end
end
if ARGV[1] == 'reserve' then reply[4 * #KEYS + 1] = fmt(now) end
-- 'reserve' denied: then the units each rule counts (before this request), for messages.
if ARGV[1] == 'reserve' and not all_allow then
  for i = 1, #KEYS do
    if windows[i] == 0 then
      reply[4 * #KEYS + 1 + i] = states[i]
    else
      reply[4 * #KEYS + 1 + i] = used(KEYS[i], states[i], limits[i], windows[i], now)
    end
  end
end
return reply

-- The decision, appended to every algorithm's script: check every rule, write only if all allow.
-- An algorithm defines read_state(key), evaluate(key, state, limit, window, now, cost) returning
-- (allowed 1/0, remaining, retry_after, reset_after), commit(key, state, limit, window, now, cost, pad) and
-- used(key, state, limit, window, now).

local now
if ARGV[2] == '' then
  local time = redis.call('TIME')
  now = tonumber(time[1]) + tonumber(time[2]) / 1000000
else
  now = tonumber(ARGV[2])
end
local cost = tonumber(ARGV[3])
local pad = tonumber(ARGV[4])

if ARGV[1] == 'used' then
  return used(KEYS[1], read_state(KEYS[1]), tonumber(ARGV[5]), tonumber(ARGV[6]), now)
end

local states, reply, all_allow = {}, {}, true
for i = 1, #KEYS do
  local state = read_state(KEYS[i])
  states[i] = state
  local allowed, remaining, retry_after, reset_after =
    evaluate(KEYS[i], state, tonumber(ARGV[3 + 2 * i]), tonumber(ARGV[4 + 2 * i]), now, cost)
  if allowed == 0 then all_allow = false end
  reply[4 * i - 3] = allowed
  reply[4 * i - 2] = remaining
  reply[4 * i - 1] = fmt(retry_after)
  reply[4 * i] = fmt(reset_after)
end
if all_allow and cost > 0 then
  for i = 1, #KEYS do
    commit(KEYS[i], states[i], tonumber(ARGV[3 + 2 * i]), tonumber(ARGV[4 + 2 * i]), now, cost, pad)
  end
end
return reply

-- The modes of every script, appended to its algorithm. A call's KEYS holds one key per rule; its ARGV is
--   mode ('decide', 'reserve', 'adjust', 'refund', 'renew' or 'used'), now ('' = Redis TIME), ttl_pad_ms,
--   at ('adjust' and 'refund': when the charge was made), lease (seconds a concurrency slot is held unless
--   renewed), lease id (the reservation's, naming its leases), then per rule: limit, window, amount (its cost
--   for 'decide', 'reserve', 'refund' and 'renew', its change for 'adjust') and, for 'adjust' only, the
--   units its charge made (the cost it was reserved at). A rule with window 0 is a concurrency limit
--   (concurrency.lua's leases).
-- An algorithm defines read_state(key), evaluate(key, state, limit, window, now, cost) returning
-- (allowed 1/0, remaining, retry_after, reset_after), commit(key, state, limit, window, now, cost, pad)
-- (returning the time it charged at when that is later than now, see below),
-- adjust(key, state, limit, window, now, at, charged, delta, pad), refund(key, state, limit, window, now,
-- at, cost, pad) and used(key, state, limit, window, now).
--
-- A batch runs the calls of one round trip in one script (coalescer.py), which spares Redis most of what
-- running a script costs (setting it up, defining every function above): ARGV is 'batch', then per call its
-- number of keys, its number of arguments (0: the same arguments as the call before it, as the decisions of
-- one policy mostly are) and those arguments; KEYS holds the calls' keys, call after call. The reply holds
-- each call's reply, an error in place of a call that failed (what it wrote before failing stays, as in a
-- script of its own); the calls that take Redis' time share one reading of it.

local function redis_time()
  local time = redis.call('TIME')
  return tonumber(time[1]) + tonumber(time[2]) / 1000000
end

-- A call's arguments, the numbers read once (calls of a batch with the same arguments share them); `now` is
-- nil for Redis' time.
local function parse(argv)
  local call = {
    mode = argv[1], now = tonumber(argv[2]), pad = tonumber(argv[3]), at = tonumber(argv[4]),
    lease = tonumber(argv[5]), lease_id = argv[6], limits = {}, windows = {}, amounts = {}, charges = {},
  }
  if call.mode == 'adjust' then
    for i = 1, (#argv - 6) / 4 do
      call.limits[i], call.windows[i], call.amounts[i], call.charges[i] = tonumber(argv[3 + 4 * i]), tonumber(argv[4 + 4 * i]), tonumber(argv[5 + 4 * i]), tonumber(argv[6 + 4 * i])
    end
    return call
  end
  for i = 1, (#argv - 6) / 3 do
    call.limits[i], call.windows[i], call.amounts[i] = tonumber(argv[4 + 3 * i]), tonumber(argv[5 + 3 * i]), tonumber(argv[6 + 3 * i])
  end
  return call
end

-- One call on its keys; `clock` reads Redis' time.
local function run(keys, call, clock)
  local mode, now, pad, lease_id = call.mode, call.now or clock(), call.pad, call.lease_id
  local limits, windows, amounts = call.limits, call.windows, call.amounts

  if mode == 'used' then
    if windows[1] == 0 then return lease_used(keys[1], now) end
    return used(keys[1], read_state(keys[1]), limits[1], windows[1], now)
  end

  -- Keep a reservation's leases (the keys of its concurrency rules only): the number of leases still held.
  if mode == 'renew' then
    local held = 0
    for i = 1, #keys do held = held + lease_renew(keys[i], lease_id, amounts[i], now, pad, call.lease) end
    return held
  end

  -- Settle a charge made at `at` (by 'reserve', whose reply ends with that time): 'adjust' moves each rule by
  -- its delta (token settlements; a concurrency rule's is minus its slots, given back), 'refund' takes back
  -- each rule's cost (a charge that was never granted).
  if mode == 'adjust' or mode == 'refund' then
    for i = 1, #keys do
      if amounts[i] ~= 0 and windows[i] == 0 then
        lease_release(keys[i], lease_id, math.abs(amounts[i]))
      elseif mode == 'refund' and amounts[i] ~= 0 then
        refund(keys[i], read_state(keys[i]), limits[i], windows[i], now, call.at, amounts[i], pad)
      elseif amounts[i] ~= 0 then
        adjust(keys[i], read_state(keys[i]), limits[i], windows[i], now, call.at, call.charges[i], amounts[i], pad)
      end
    end
    return fmt(now)
  end

  -- Check every rule, write only if all allow. The reply: allowed, remaining, retry_after, reset_after per
  -- rule; for 'reserve', then the time of the charge (which 'adjust' and 'refund' take).
  local states, reply, all_allow = {}, {}, true
  for i = 1, #keys do
    local state, allowed, remaining, retry_after, reset_after
    if windows[i] == 0 then
      state = lease_read(keys[i], now)
      allowed, remaining, retry_after, reset_after = lease_evaluate(state, limits[i], amounts[i])
    else
      state = read_state(keys[i])
      allowed, remaining, retry_after, reset_after = evaluate(keys[i], state, limits[i], windows[i], now, amounts[i])
    end
    states[i] = state
    if allowed == 0 then all_allow = false end
    reply[4 * i - 3] = allowed
    reply[4 * i - 2] = remaining
    reply[4 * i - 1] = fmt(retry_after)
    reply[4 * i] = fmt(reset_after)
  end
  -- The time of the charge: a key's time never runs backwards, so after Redis' clock stepped back a charge
  -- lands later than now (a sliding log's at its newest entry, a window's in the key's later window, at its
  -- start), where its settlement must look for it. A key of the call that charged at an earlier time then
  -- misses its settlement (see DESIGN.md).
  local charged_at = now
  if all_allow then
    for i = 1, #keys do
      if amounts[i] > 0 and windows[i] == 0 then
        lease_take(keys[i], lease_id, amounts[i], now, pad, call.lease)
      elseif amounts[i] > 0 then
        local at = commit(keys[i], states[i], limits[i], windows[i], now, amounts[i], pad)
        if at and at > charged_at then charged_at = at end
      end
    end
  end
  if mode == 'reserve' then reply[4 * #keys + 1] = fmt(charged_at) end
  -- 'reserve' denied: then the units each rule counts (before this request), for messages.
  if mode == 'reserve' and not all_allow then
    for i = 1, #keys do
      if windows[i] == 0 then
        reply[4 * #keys + 1 + i] = states[i]
      else
        reply[4 * #keys + 1 + i] = used(keys[i], states[i], limits[i], windows[i], now)
      end
    end
  end
  return reply
end

if ARGV[1] ~= 'batch' then return run(KEYS, parse(ARGV), redis_time) end

local now
local function batch_time()
  if not now then now = redis_time() end
  return now
end

local replies, call, key, arg = {}, nil, 0, 2
while arg <= #ARGV do
  local key_count, arg_count = tonumber(ARGV[arg]), tonumber(ARGV[arg + 1])
  if arg_count > 0 then call = parse({ unpack(ARGV, arg + 2, arg + 1 + arg_count) }) end
  local ok, reply = pcall(run, { unpack(KEYS, key + 1, key + key_count) }, call, batch_time)
  if not ok and type(reply) ~= 'table' then reply = redis.error_reply(tostring(reply)) end -- a table: one already
  replies[#replies + 1] = reply
  key, arg = key + key_count, arg + 2 + arg_count
end
return replies

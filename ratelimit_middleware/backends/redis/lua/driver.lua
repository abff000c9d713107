-- The modes of every script, appended to its algorithm. A call's KEYS holds one key per rule; its ARGV is
--   mode ('decide', 'reserve', 'adjust', 'refund', 'renew' or 'used'), now ('' = Redis TIME), ttl_pad_ms,
--   lease (seconds a concurrency slot is held unless renewed), lease id (the reservation's, naming its
--   leases), then per rule: limit, window, amount (its cost for 'decide', 'reserve', 'refund' and 'renew', its
--   change for 'adjust') and, for 'adjust' and 'refund', the time its charge was made at ('reserve' replies
--   with it), and for 'adjust' then the units that charge made (the cost it was reserved at). A rule with
--   window 0 is a concurrency limit (concurrency.lua's leases).
-- An algorithm defines read_state(key), evaluate(key, state, limit, window, now, cost) returning
-- (allowed 1/0, remaining, retry_after, reset_after), commit(key, state, limit, window, now, cost, pad),
-- charged_at(state, window, now) (the time a charge made at now counts at, see below),
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
  local mode = argv[1]
  local call = {
    mode = mode, now = tonumber(argv[2]), pad = tonumber(argv[3]), lease = tonumber(argv[4]),
    lease_id = argv[5], limits = {}, windows = {}, amounts = {}, times = {}, charges = {},
  }
  local width = 3
  if mode == 'adjust' then width = 5 elseif mode == 'refund' then width = 4 end
  for i = 1, (#argv - 5) / width do
    local a = 5 + width * (i - 1)
    call.limits[i], call.windows[i], call.amounts[i] = tonumber(argv[a + 1]), tonumber(argv[a + 2]), tonumber(argv[a + 3])
    if width > 3 then call.times[i] = tonumber(argv[a + 4]) end
    if width > 4 then call.charges[i] = tonumber(argv[a + 5]) end
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

  -- Settle each rule's charge at the time it was made (by 'reserve', whose reply names it): 'adjust' moves
  -- each rule by its delta (token settlements; a concurrency rule's is minus its slots, given back), 'refund'
  -- takes back each rule's cost (a charge that was never granted).
  if mode == 'adjust' or mode == 'refund' then
    local times = call.times
    for i = 1, #keys do
      if amounts[i] ~= 0 and windows[i] == 0 then
        lease_release(keys[i], lease_id, math.abs(amounts[i]))
      elseif mode == 'refund' and amounts[i] ~= 0 then
        refund(keys[i], read_state(keys[i]), limits[i], windows[i], now, times[i], amounts[i], pad)
      elseif amounts[i] ~= 0 then
        adjust(keys[i], read_state(keys[i]), limits[i], windows[i], now, times[i], call.charges[i], amounts[i], pad)
      end
    end
    return fmt(now)
  end

  -- Check every rule, write only if all allow. The reply: allowed, remaining, retry_after, reset_after per
  -- rule; for 'reserve', then the time of the charge (see below).
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
  -- The time of the charge, where its settlement looks for it: now, for every rule. But a key's time never
  -- runs backwards, so after Redis' clock stepped back a charge may land later than now (a sliding log's at
  -- its newest entry, a window's in the key's later window, at its start), and other keys of the call at now:
  -- the reply then names the time of each rule's charge, in a list. A rule charged nothing (an estimate of 0
  -- tokens) has a time too, where a charge would have landed: its settlement may charge an overage.
  local later
  if all_allow then
    for i = 1, #keys do
      if windows[i] ~= 0 and mode == 'reserve' then
        local at = charged_at(states[i], windows[i], now)
        if at > now then
          later = later or {}
          later[i] = at
        end
      end
      if amounts[i] > 0 and windows[i] == 0 then
        lease_take(keys[i], lease_id, amounts[i], now, pad, call.lease)
      elseif amounts[i] > 0 then
        commit(keys[i], states[i], limits[i], windows[i], now, amounts[i], pad)
      end
    end
  end
  if mode == 'reserve' then
    local stamp = fmt(now)
    if later then
      local times = {}
      for i = 1, #keys do
        if later[i] then times[i] = fmt(later[i]) else times[i] = stamp end
      end
      reply[4 * #keys + 1] = times
    else
      reply[4 * #keys + 1] = stamp
    end
  end
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

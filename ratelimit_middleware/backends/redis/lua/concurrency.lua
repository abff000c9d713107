-- Concurrency (algorithms/concurrency.py) as leases, for the rules whose window is 0: one ZSET per key of
-- lease ids scored by their expiry time. Expired leases (a worker that died holding one) are dropped on
-- every evaluation, and the key expires with its last lease: a slot can never leak for good.

-- The leases taken now (expired ones removed first).
local function lease_read(key, now)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now))
  return redis.call('ZCARD', key)
end

local function lease_evaluate(taken, limit, cost)
  if taken + cost <= limit then return 1, limit - taken - cost, 0, 0 end
  return 0, 0, 1, 1 -- RETRY_AFTER: when a slot frees up is unknowable
end

-- Take `cost` leases expiring at `at` + lease; leases taken at one instant share a score (and so are
-- interchangeable), each with a member of its own.
local function lease_take(key, at, cost, pad, lease)
  local score = fmt(at + lease)
  for _ = 1, cost do
    local n = 0
    while redis.call('ZADD', key, 'NX', score, score .. '#' .. n) == 0 do n = n + 1 end
  end
  redis.call('PEXPIRE', key, ttl_ms(lease, pad))
end

-- Give back -delta leases of the charge made at `at` (any of those taken at that instant: they expire
-- together); a lease that already expired is gone and nothing happens.
local function lease_adjust(key, at, delta, pad, lease)
  if delta > 0 then
    lease_take(key, at, delta, pad, lease)
    return
  end
  local score = fmt(at + lease)
  for _ = 1, -delta do
    local found = redis.call('ZRANGEBYSCORE', key, score, score, 'LIMIT', 0, 1)
    if #found == 0 then return end
    redis.call('ZREM', key, found[1])
  end
end

local function lease_used(key, now)
  return redis.call('ZCOUNT', key, '(' .. fmt(now), '+inf')
end

-- Concurrency (algorithms/concurrency.py) as leases, for the rules whose window is 0: one ZSET per key of
-- leases scored by their expiry time. A reservation names its leases `<lease id>#<n>` (n from 0 to its cost
-- minus 1; the id is unique per reservation), so that it can renew and give back exactly its own. Expired
-- leases (a worker that died holding one, or a stream that stopped renewing) are dropped on every
-- evaluation, and the key expires with its last lease: a slot can never leak for good.

-- The leases held now (expired ones removed first).
local function lease_read(key, now)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now))
  return redis.call('ZCARD', key)
end

local function lease_evaluate(taken, limit, cost)
  if taken <= limit - cost then return 1, limit - taken - cost, 0, 0 end
  return 0, 0, 1, 1 -- RETRY_AFTER: when a slot frees up is unknowable
end

-- The key lives until its latest lease expires: processes with another `lease` may share it.
local function lease_expire(key, now, pad)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if not last[2] then return end
  -- Rounded to the microsecond: the score's text carries float noise that would add a millisecond.
  local left = math.floor((tonumber(last[2]) - now) * 1e6 + 0.5) / 1e6
  redis.call('PEXPIRE', key, ttl_ms(left, pad))
end

-- Take `cost` leases expiring `lease` seconds after `now`.
local function lease_take(key, id, cost, now, pad, lease)
  local score = fmt(now + lease)
  for n = 0, cost - 1 do redis.call('ZADD', key, score, id .. '#' .. n) end
  lease_expire(key, now, pad)
end

-- Give back `count` leases of reservation `id`; one that already expired is gone and nothing happens.
local function lease_release(key, id, count)
  for n = 0, count - 1 do redis.call('ZREM', key, id .. '#' .. n) end
end

-- Extend the `cost` leases of reservation `id` to `lease` seconds from now; the number still held (one that
-- expired is not taken again: its slot may have gone to another request meanwhile).
local function lease_renew(key, id, cost, now, pad, lease)
  lease_read(key, now)
  local score, held = fmt(now + lease), 0
  for n = 0, cost - 1 do
    local member = id .. '#' .. n
    if redis.call('ZSCORE', key, member) then
      redis.call('ZADD', key, score, member)
      held = held + 1
    end
  end
  if held > 0 then lease_expire(key, now, pad) end
  return held
end

local function lease_used(key, now)
  return redis.call('ZCOUNT', key, '(' .. fmt(now), '+inf')
end

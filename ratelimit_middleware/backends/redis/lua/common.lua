-- Shared helpers, prepended to every algorithm's script (see scripts.py and driver.lua for KEYS and ARGV).
-- Floats cross the reply as strings ('%.17g': exact), since Redis truncates Lua numbers to integers. The
-- arithmetic mirrors the Python algorithms operation for operation, so both backends agree to the bit.
-- On the paths every decision takes, numbers go to redis.call as strings too: Redis would format a Lua
-- number with '%.17g', which costs about half as much as a simple command.
-- Limits, costs and counts are integers up to 2^53 (config.MAX_AMOUNT), exact in doubles, and so is every
-- difference of two of them; a sum may pass 2^53, where doubles skip integers (2^53 + 1 is 2^53), so a check
-- reads `units <= limit - cost`, never `units + cost <= limit`.

if redis.replicate_commands then redis.replicate_commands() end -- Redis < 5: TIME before writes

-- A float as '%.17g' writes it; whole numbers by '%d' (the same digits below 2^53, at a fraction of the cost).
local function fmt(x)
  if x == 0 then return '0' end
  if x % 1 == 0 and x > -2^53 and x < 2^53 then return string.format('%d', x) end
  return string.format('%.17g', x)
end

-- Python's int(x): truncation toward zero.
local function trunc(x)
  if x >= 0 then return math.floor(x) end
  return math.ceil(x)
end

-- Python's float floor division x // y (floatobject.c), bit for bit; math.floor(x / y) differs at times.
local function floordiv(x, y)
  local mod = math.fmod(x, y)
  local div = (x - mod) / y
  if mod ~= 0 and ((y < 0) ~= (mod < 0)) then
    div = div - 1.0
  end
  if div == 0 then return 0.0 end
  local floored = math.floor(div)
  if div - floored > 0.5 then floored = floored + 1.0 end
  return floored
end

-- Python's math.nextafter(x, math.inf), bit for bit (Lua 5.1 has no nextafter): x plus the spacing of the
-- floats just above it, from its exponent (half that below a negative power of two; subnormals step by the
-- least float).
local TINY = 2 ^ -1074
local function next_up(x)
  if x ~= x or x == math.huge then return x end
  if x == -math.huge then return -1.7976931348623157e308 end
  if x == 0 then return TINY end
  local m, e = math.frexp(x)
  local step = math.ldexp(1, e - 53)
  if m == -0.5 then step = step / 2 end
  if step < TINY then step = TINY end
  return x + step
end

-- algorithms/base.py's wait_until: `wait`, raised to the next floats if needed, until a retry at now + wait
-- is admitted (`admits(later)`): the wait and the client's sum both round.
local function wait_until(now, wait, admits)
  for _ = 1, 64 do
    local later = now + wait
    if admits(later) then break end
    local past, bumped = next_up(later) - now, next_up(wait)
    if past > bumped then wait = past else wait = bumped end
  end
  return wait
end

-- The first time of aligned window k by floordiv: k * window, raised to the next floats while that rounds
-- into window k - 1 (a decimal window's start may).
local function window_start(k, window)
  local start = k * window
  while floordiv(start, window) < k do start = next_up(start) end
  return start
end

-- min(max(x, 0), limit): a settled count is never negative, and a window never more than full.
local function clamp(x, limit)
  if x < 0 then return 0 end
  if x > limit then return limit end
  return x
end

-- Milliseconds for PEXPIRE: at least 1, rounded up, plus the pad an injected clock asks for.
local function ttl_ms(seconds, pad)
  local ms = math.ceil(seconds * 1000)
  if ms < 1 then ms = 1 end
  return string.format('%d', ms + pad)
end

-- Shared helpers, prepended to every algorithm's script (see scripts.py and driver.lua for KEYS and ARGV).
-- Floats cross the reply as strings ('%.17g': exact), since Redis truncates Lua numbers to integers. The
-- arithmetic mirrors the Python algorithms operation for operation, so both backends agree to the bit.
-- On the paths every decision takes, numbers go to redis.call as strings too: Redis would format a Lua
-- number with '%.17g', which costs about half as much as a simple command.

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

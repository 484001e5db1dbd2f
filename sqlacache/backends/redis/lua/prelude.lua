-- Shared by every script. Values are parsed strictly (digits only) so that a foreign or damaged value
-- reads as missing instead of raising inside the script. Numbers are written back with
-- string.format('%d'): Lua would format a microsecond generation as 1.7e+15.
local function get(key)
  local value = redis.pcall('GET', key)
  if type(value) == 'table' and value.err then
    return nil, true
  end
  if not value then
    return nil, false
  end
  return value, false
end

-- A version is digits; a table's scheme registry ("v:s:<table>") is digits then "|scheme|scheme…".
local function num(value)
  if value then
    local digits = string.match(value, '^(%d+)$') or string.match(value, '^(%d+)|')
    if digits then
      return tonumber(digits)
    end
  end
  return nil
end

-- Give a version a new value. A missing row or condition version stays missing: nothing valid
-- depends on it, and not creating it keeps metadata proportional to what is cached, not to what
-- is written. A table's own version is created (there are few), so that the table's other
-- missing versions can start from it (see the store script's floor).
local function bump_version(key, g, create_ttl)
  local value = get(key)
  if not value then
    if create_ttl then
      redis.call('SET', key, g, 'PX', create_ttl)
    end
    return
  end
  local schemes = string.match(value, '^%d+(|.*)$') or ''
  redis.call('SET', key, g .. schemes, 'KEEPTTL')
end

local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function current_generation(prefix)
  local value = get(prefix .. ':gen')
  if num(value) then
    return value
  end
  return string.format('%d', clock())
end

local function next_generation(prefix)
  local key = prefix .. ':gen'
  local g = (num((get(key))) or 0) + 1
  local now = clock()
  if g <= now then
    g = now + 1
  end
  local s = string.format('%d', g)
  redis.call('SET', key, s)
  return g, s
end

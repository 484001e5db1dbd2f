-- KEYS[1] entry key, KEYS[2] (optional) its lease; ARGV[1] prefix, ARGV[2] lease token, ARGV[3]
-- lease ms, ARGV[4] version ttl ms (or ''), ARGV[5..] the dependencies the reader expects.
-- Returns {0, gen} for a miss, {2, gen} for a corrupt entry (deleted), {1, gen, value} for a hit;
-- with a lease key, a miss also tries to take the lease: {0|2, gen, 1 taken | 0 held}.
-- Runs after prelude.lua (scripts.py joins them).
local prefix = ARGV[1]
-- A miss makes the roots of the expected dependencies exist (each table's "t:", "d:" and "*"):
-- created missing, as "bumped now" (a new generation, which this reader then gets), so that the
-- store that follows a first read is accepted, while a root that was lost (or deleted by an
-- invalidation under OOM) still outdates every entry that depended on it. Any write from now on
-- moves the roots past this reader.
local function materialize(g)
  local vttl = ARGV[4]
  if not vttl or vttl == '' or #ARGV < 5 then
    return g
  end
  -- Each root once, read in one MGET (a table's dependencies share its "t:" root; each call into
  -- Redis from Lua costs about as much as the command).
  local keys, seen = {}, {}
  for i = 5, #ARGV do
    local dep = ARGV[i]
    local tbl = string.match(dep, '^[cras]:([^:]*)')
    local key = prefix .. ':v:' .. (tbl and ('t:' .. tbl) or dep)
    if not seen[key] then
      seen[key] = true
      keys[#keys + 1] = key
    end
  end
  local values = redis.call('MGET', unpack(keys))
  local fresh = nil
  for i, key in ipairs(keys) do
    if not num(values[i]) then -- missing, or of another type (MGET reads it as nil)
      if not fresh then
        local _, s = next_generation(prefix)
        fresh = s
      end
      redis.call('SET', key, fresh, 'PX', vttl)
    end
  end
  return fresh or g
end
local function miss(status)
  local reply = {status, materialize(current_generation(prefix))}
  if KEYS[2] then
    reply[3] = redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) and 1 or 0
  end
  return reply
end
local raw, wrong_type = get(KEYS[1])
if wrong_type then
  redis.call('DEL', KEYS[1])
  return miss(2)
end
if not raw then
  return miss(0)
end
local nl = string.find(raw, '\n', 1, true)
if not nl then
  redis.call('DEL', KEYS[1])
  return miss(2)
end
local header = string.sub(raw, 1, nl - 1)
local fields = {}
local pos = 1
while true do
  local sep = string.find(header, '\31', pos, true)
  if not sep then
    fields[#fields + 1] = string.sub(header, pos)
    break
  end
  fields[#fields + 1] = string.sub(header, pos, sep - 1)
  pos = sep + 1
end
local generation = num(fields[1])
if not generation then
  redis.call('DEL', KEYS[1])
  return miss(2)
end
-- The versions and the generation in one MGET: each call into Redis from Lua costs about as much
-- as the command itself, and a hit is the path that must cost least. (MGET reads a key of another
-- type as nil: a missing version, which is a miss as it must be.)
local names = {}
for i = 2, #fields do
  names[i - 1] = prefix .. ':v:' .. fields[i]
end
names[#fields] = prefix .. ':gen'
local values = redis.call('MGET', unpack(names))
for i = 1, #fields - 1 do
  local version = num(values[i])
  if not version or version > generation then
    redis.call('DEL', KEYS[1])
    return miss(0)
  end
end
local current = values[#fields]
if not num(current) then
  current = current_generation(prefix)
end
return {1, current, raw}

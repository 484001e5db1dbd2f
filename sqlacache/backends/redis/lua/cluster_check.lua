-- Redis Cluster: the store's check, in one group (one hash slot: every key below starts with
-- ARGV[1], the group's base "<prefix>:{<prefix>|t|<table>}" or "<prefix>:{<prefix>|g}").
-- KEYS[1] the group's generation (routes the call); ARGV[1] base, ARGV[2] the reader's generation
-- for this group, ARGV[3] entry ttl ms, ARGV[4] version ttl ms, ARGV[5..] the deps in this group.
-- Returns {1 accepted | 0 refused, the group's current generation, 1 if it created a missing
-- global dependency (``*``, ``d:…``: the client then creates it in the other stripes too)}. Same rules as store.lua (floor,
-- scheme registry, a missing version created "bumped now"), without the entry: the entry lives in
-- another slot and is written by the client after every group accepted (cluster.py says why a
-- write in between cannot get a stale entry served). Runs after prelude.lua.
local prefix = ARGV[1]
local generation = num(ARGV[2])
local ttl = tonumber(ARGV[3])
local vttl = ARGV[4]
local accepted = generation ~= nil
local fresh = nil
local created_global = 0
local function now()
  if not fresh then
    local _, s = next_generation(prefix)
    fresh = s
  end
  return fresh
end
local function floor(tbl)
  if not generation then
    return nil
  end
  local tkey = prefix .. ':v:t:' .. tbl
  local value = get(tkey)
  local n = num(value)
  if not n then
    redis.call('SET', tkey, now(), 'PX', vttl)
    return nil
  end
  if n > generation then
    return nil
  end
  local pttl = redis.call('PTTL', tkey)
  if pttl >= 0 and pttl < tonumber(vttl) then
    redis.call('PEXPIRE', tkey, vttl)
  end
  return string.format('%d', n)
end
for i = 5, #ARGV do
  local tbl, scheme = string.match(ARGV[i], '^c:([^:]*):([^:]*):')
  if tbl then
    local rkey = prefix .. ':v:s:' .. tbl
    local value = get(rkey)
    local current = num(value)
    if not (current and string.find(value .. '|', '|' .. scheme .. '|', 1, true)) then
      local start = floor(tbl)
      if not start then
        start = now()
        accepted = false
      end
      if current then
        if current > tonumber(start) then
          start = string.format('%d', current)
        end
        local schemes = string.match(value, '^%d+(|.*)$') or ''
        redis.call('SET', rkey, start .. schemes .. '|' .. scheme, 'KEEPTTL')
      else
        redis.call('SET', rkey, start .. '|' .. scheme, 'PX', vttl)
      end
    end
  end
end
for i = 5, #ARGV do
  local dep = ARGV[i]
  local key = prefix .. ':v:' .. dep
  local version = num((get(key)))
  if not version then
    local tbl = string.match(dep, '^[cr]:([^:]*):') or string.match(dep, '^[as]:([^:]*)$')
    local start = tbl and floor(tbl)
    if start then
      redis.call('SET', key, start, 'PX', vttl)
    else
      redis.call('SET', key, now(), 'PX', vttl)
      accepted = false
      if not string.match(dep, '^[trcas]:') then
        created_global = 1
      end
    end
  elseif not accepted or version > generation then
    accepted = false
  end
end
if accepted then
  for i = 5, #ARGV do
    local key = prefix .. ':v:' .. ARGV[i]
    local pttl = redis.call('PTTL', key)
    if pttl >= 0 and pttl < ttl then
      redis.call('PEXPIRE', key, ARGV[3])
    end
  end
end
return {accepted and 1 or 0, current_generation(prefix), created_global}

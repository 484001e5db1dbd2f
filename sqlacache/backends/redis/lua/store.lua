-- KEYS[1] entry key, KEYS[2] (optional) the filler's lease; ARGV[1] prefix, ARGV[2] reader's
-- generation, ARGV[3] entry ttl ms, ARGV[4] entry value, ARGV[5] version ttl ms, ARGV[6] the lease's
-- token (released if still ours, stored or not), ARGV[7..] deps. Returns 1 if stored, 0 if refused.
-- Runs after prelude.lua (scripts.py joins them).
local prefix = ARGV[1]
local generation = num(ARGV[2])
local ttl = tonumber(ARGV[3])
local vttl = ARGV[5]
if KEYS[2] and redis.call('GET', KEYS[2]) == ARGV[6] then
  redis.call('DEL', KEYS[2])
end
local accepted = generation ~= nil
local fresh = nil
local function now()
  if not fresh then
    local _, s = next_generation(prefix)
    fresh = s
  end
  return fresh
end
-- Where a missing version of <table> (row, condition, registry, all rows) may start: at the
-- table's own version, which every write to the table moves (it exists only while it is at least
-- as new as the table's last write). Nil when that is missing or newer than this reader: then
-- the missing version counts as "bumped now".
local function floor(tbl)
  if not generation then
    return nil
  end
  local tkey = prefix .. ':v:t:' .. tbl
  local value = get(tkey)
  local n = num(value)
  if not n then
    -- Lost (or never written): create it as "bumped now", so that the next readers have a floor.
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
-- A condition dependency "c:<table>:<columns>:<tokens>" is only bumped by writers that find its
-- scheme (<columns>) in the table's registry, so the registry's version (every condition entry
-- of the table depends on it) must start no older than the last write that may not have known it.
for i = 7, #ARGV do
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
for i = 7, #ARGV do
  local dep = ARGV[i]
  local key = prefix .. ':v:' .. dep
  local version = num((get(key)))
  if not version then
    local tbl = string.match(dep, '^[cr]:([^:]*):') or string.match(dep, '^[as]:([^:]*)$')
    local start = tbl and floor(tbl)
    if start then
      redis.call('SET', key, start, 'PX', vttl)
    else
      -- A lost version counts as bumped now: refuse, and create it so that the next reader can store.
      redis.call('SET', key, now(), 'PX', vttl)
      accepted = false
    end
  elseif not accepted or version > generation then
    accepted = false
  end
end
if not accepted then
  return 0
end
redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[3])
for i = 7, #ARGV do
  local key = prefix .. ':v:' .. ARGV[i]
  local pttl = redis.call('PTTL', key)
  -- -1: no expiry, keep it that way. Otherwise outlive the entry, never shorten.
  if pttl >= 0 and pttl < ttl then
    redis.call('PEXPIRE', key, ARGV[3])
  end
end
return 1

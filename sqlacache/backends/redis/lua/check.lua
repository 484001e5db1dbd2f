-- The store's check, shared by store.lua (one Redis: then the entry is written) and cluster_check.lua
-- (one group of a Redis Cluster: the client writes the entry once every group accepted). Runs after
-- prelude.lua (scripts.py joins them).
--
-- check(prefix, generation, vttl, first): the dependencies are ARGV[first..]. Accepted when every
-- one has a version no newer than the reader's ``generation`` (a number, or nil: refused). A
-- missing version is created: from its table's floor when that is no newer than the reader, else
-- "bumped now" (and the store is refused). Returns accepted, and whether a missing dependency of no
-- table (``*``, ``d:…``) was created.
local function check(prefix, generation, vttl, first)
  local accepted = generation ~= nil
  local fresh = nil
  local created_global = false
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
  for i = first, #ARGV do
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
  for i = first, #ARGV do
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
        if not string.match(dep, '^[trcas]:') then
          created_global = true
        end
      end
    elseif not accepted or version > generation then
      accepted = false
    end
  end
  return accepted, created_global
end

-- The versions of ARGV[first..] outlive an entry of ``ttl_ms`` (a string): never shortened, and
-- one without expiry (-1) is kept that way.
local function keep_versions(prefix, first, ttl_ms)
  local ttl = tonumber(ttl_ms)
  for i = first, #ARGV do
    local key = prefix .. ':v:' .. ARGV[i]
    local pttl = redis.call('PTTL', key)
    if pttl >= 0 and pttl < ttl then
      redis.call('PEXPIRE', key, ttl_ms)
    end
  end
end

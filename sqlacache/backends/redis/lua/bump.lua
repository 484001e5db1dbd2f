-- ARGV[1] prefix, ARGV[2] version ttl ms, ARGV[3] number of deps n — or, with a secret,
-- "<n>\x1f<r>\x1f<k>": a fresh nonce and its one-time key, both hex (backends/redis/signing.py) —,
-- ARGV[4..n+3] deps, then row images, each "<table>\x1f<guard or ->\x1f<column>\x1f<token>…".
-- Returns the new generation.
-- Each image bumps, for every scheme registered for its table, the condition dependency its values
-- name — or the whole registry (every condition entry of the table) when it lacks a column.
-- Every bump is then published on "<prefix>:fanout" as "<born>.<n>\x1f<dep>\x1f<dep>…": its place
-- in the sequence (so the order of messages is the order of bumps) and every dependency this bump
-- moved (or deleted), for the near-caches of every process (backends/redis/fanout.py). Under
-- maxmemory with noeviction the sequence can't be kept: it is deleted and the message says "-"
-- (subscribers empty their near-cache and resynchronise). Signed (given r and k), the message is
-- "<stamp>\x1f<r>\x1f<mac>\x1f<dep>…", mac = HMAC-SHA1(k, "<stamp>\x1f<dep>…") in hex (k: its 64 hex
-- characters, taken as they are): the
-- subscribers derive k from r with the secret, which never reaches Redis.
-- Runs after prelude.lua (scripts.py joins them).
local prefix = ARGV[1]
local vttl = ARGV[2]
local ndeps, nonce, onekey = string.match(ARGV[3], '^(%d+)\31(%x+)\31(' .. string.rep('%x', 64) .. ')$')
ndeps = tonumber(ndeps or ARGV[3])
-- Under maxmemory with noeviction, writes fail but deletes don't: a deleted version reads as
-- "bumped now" everywhere, so an invalidation still gets through (coarser: whole tables).
local key = prefix .. ':gen'
local g = (num((get(key))) or 0) + 1
local now = clock()
if g <= now then
  g = now + 1
end
g = string.format('%d', g)
local full = redis.pcall('SET', key, g)
local evict = type(full) == 'table' and full.err ~= nil
local done = {}
local function bump(dep)
  if not done[dep] then
    done[dep] = true
    if evict then
      redis.call('DEL', prefix .. ':v:' .. dep)
    else
      bump_version(prefix .. ':v:' .. dep, g, string.sub(dep, 1, 2) == 't:' and vttl)
    end
  end
end
-- Parse the images and check their guards first: a guarded image holds values an object was
-- loaded with, current only if its table had no committed write since (before this bump moves
-- the table's own version).
local images = {}
for i = 4 + ndeps, #ARGV do
  local fields = {}
  for f in string.gmatch(ARGV[i], '[^\31]+') do
    fields[#fields + 1] = f
  end
  local values = {}
  for j = 3, #fields - 1, 2 do
    values[fields[j]] = fields[j + 1]
  end
  local trusted = not evict
  if trusted and fields[2] ~= '-' then
    local current = num((get(prefix .. ':v:t:' .. fields[1])))
    trusted = current ~= nil and current <= tonumber(fields[2])
  end
  images[#images + 1] = {fields[1], values, trusted}
end
for i = 4, 3 + ndeps do
  bump(ARGV[i])
end
local registries = {}
for _, image in ipairs(images) do
  local tbl = image[1]
  local values = image[2]
  if not image[3] then
    values = {}
  end
  if evict then
    bump('t:' .. tbl)
    bump('s:' .. tbl)
  end
  local schemes = evict and {} or registries[tbl]
  if not schemes then
    schemes = {}
    local value = get(prefix .. ':v:s:' .. tbl)
    if value then
      for scheme in string.gmatch(value, '|([^|]+)') do
        schemes[#schemes + 1] = scheme
      end
    end
    registries[tbl] = schemes
  end
  for _, scheme in ipairs(schemes) do
    local tokens = {}
    local known = true
    for column in string.gmatch(scheme, '[^,]+') do
      local t = values[column]
      if not t then
        known = false
        break
      end
      tokens[#tokens + 1] = t
    end
    if known then
      bump('c:' .. tbl .. ':' .. scheme .. ':' .. table.concat(tokens, ','))
    else
      bump('s:' .. tbl)
    end
  end
end
local moved = {}
for dep in pairs(done) do
  moved[#moved + 1] = dep
end
-- The sequence: "<prefix>:seq" is a hash {n, born}; born (the clock when n started at 1) tells a
-- counter that restarted (Redis restarted empty, FLUSHDB, clear) from one that went on.
local seqkey = prefix .. ':seq'
local stamp = '-'
local n = redis.pcall('HINCRBY', seqkey, 'n', 1)
if type(n) == 'number' then
  if n == 1 then
    redis.pcall('HSET', seqkey, 'born', string.format('%d', clock()))
  end
  local born = redis.call('HGET', seqkey, 'born')
  if born then
    stamp = born .. '.' .. string.format('%d', n)
  end
end
if stamp == '-' then
  redis.call('DEL', seqkey)
end
local deps = table.concat(moved, '\31')
local message = stamp .. '\31' .. deps
if nonce then
  -- HMAC-SHA1 (RFC 2104; SHA-1 is the one hash Redis's Lua has) keyed with the 64 hex characters
  -- of k as they are: one SHA-1 block, no padding; the key XOR ipad (0x36) and XOR opad (0x5c) are
  -- then substitutions of its 16 possible characters (a gsub with a table: no bit call per byte).
  local ipad = string.gsub(onekey, '.', {
    ['0'] = '\6', ['1'] = '\7', ['2'] = '\4', ['3'] = '\5', ['4'] = '\2', ['5'] = '\3', ['6'] = '\0',
    ['7'] = '\1', ['8'] = '\14', ['9'] = '\15', a = 'W', b = 'T', c = 'U', d = 'R', e = 'S', f = 'P'})
  local opad = string.gsub(onekey, '.', {
    ['0'] = 'l', ['1'] = 'm', ['2'] = 'n', ['3'] = 'o', ['4'] = 'h', ['5'] = 'i', ['6'] = 'j',
    ['7'] = 'k', ['8'] = 'd', ['9'] = 'e', a = '=', b = '>', c = '?', d = '8', e = '9', f = ':'})
  local hex = redis.sha1hex(ipad .. message)
  local inner = {}
  for i = 1, 20 do
    inner[i] = tonumber(string.sub(hex, 2 * i - 1, 2 * i), 16)
  end
  local mac = redis.sha1hex(opad .. string.char(unpack(inner)))
  message = stamp .. '\31' .. nonce .. '\31' .. mac .. '\31' .. deps
end
redis.call('PUBLISH', prefix .. ':fanout', message)
return g

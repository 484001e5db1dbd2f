-- Redis Cluster, the entry's slot (an entry and its lease share a hash tag).
-- KEYS[1] entry, KEYS[2] its lease. ARGV[1] op:
--   'get'   ARGV[2] token, ARGV[3] lease ms: {1, value} | {0, 1 lease taken | 0 held}
--   'drop'  ARGV[2] token, ARGV[3] lease ms: delete a stale entry, then try the lease: {0, 1 | 0}
--   'set'   ARGV[2] value, ARGV[3] ttl ms, ARGV[4] token ('' none): store, release the lease: 1
--   'free'  ARGV[2] token: release the lease only: 1
local op = ARGV[1]
local function release(token)
  if token ~= '' and redis.call('GET', KEYS[2]) == token then
    redis.call('DEL', KEYS[2])
  end
end
if op == 'set' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  release(ARGV[4])
  return 1
end
if op == 'free' then
  release(ARGV[2])
  return 1
end
if op == 'get' then
  local raw = redis.pcall('GET', KEYS[1])
  if type(raw) == 'string' then
    return {1, raw}
  end
  if type(raw) == 'table' and raw.err then
    redis.call('DEL', KEYS[1])
  end
else
  redis.call('DEL', KEYS[1])
end
return {0, redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) and 1 or 0}

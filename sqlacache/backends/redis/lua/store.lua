-- KEYS[1] entry key, KEYS[2] (optional) the filler's lease; ARGV[1] prefix, ARGV[2] reader's
-- generation, ARGV[3] entry ttl ms, ARGV[4] entry value, ARGV[5] version ttl ms, ARGV[6] the lease's
-- token (released if still ours, stored or not), ARGV[7..] deps. Returns 1 if stored, 0 if refused.
-- Runs after prelude.lua and check.lua (scripts.py joins them): check.lua says what is accepted.
local prefix = ARGV[1]
if KEYS[2] and redis.call('GET', KEYS[2]) == ARGV[6] then
  redis.call('DEL', KEYS[2])
end
local accepted = check(prefix, num(ARGV[2]), ARGV[5], 7)
if not accepted then
  return 0
end
redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[3])
keep_versions(prefix, 7, ARGV[3])
return 1

-- Redis Cluster: the store's check, in one group (one hash slot: every key below starts with
-- ARGV[1], the group's base "<prefix>:{<prefix>|t|<table>}" or "<prefix>:{<prefix>|s|<i>}").
-- KEYS[1] the group's generation (routes the call); ARGV[1] base, ARGV[2] the reader's generation
-- for this group, ARGV[3] entry ttl ms, ARGV[4] version ttl ms, ARGV[5..] the deps in this group.
-- Returns {1 accepted | 0 refused, the group's current generation, 1 if it created a missing
-- global dependency (``*``, ``d:…``: the client then creates it in the other stripes too)}.
-- check.lua's rules (as store.lua's), without the entry: the entry lives in another slot and is
-- written by the client after every group accepted (cluster.py says why a write in between cannot
-- get a stale entry served). Runs after prelude.lua and check.lua.
local prefix = ARGV[1]
local accepted, created_global = check(prefix, num(ARGV[2]), ARGV[4], 5)
if accepted then
  keep_versions(prefix, 5, ARGV[3])
end
return {accepted and 1 or 0, current_generation(prefix), created_global and 1 or 0}

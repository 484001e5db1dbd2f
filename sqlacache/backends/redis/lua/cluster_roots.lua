-- Redis Cluster: a miss makes the roots it expects exist, in one group (see lookup.lua's
-- materialize). KEYS[1] the group's generation; ARGV[1] base, ARGV[2] version ttl ms, ARGV[3..]
-- roots. A missing root is created "bumped now". Returns the group's current generation.
-- Runs after prelude.lua.
local prefix = ARGV[1]
local fresh = nil
for i = 3, #ARGV do
  local key = prefix .. ':v:' .. ARGV[i]
  if not num((get(key))) then
    if not fresh then
      local _, s = next_generation(prefix)
      fresh = s
    end
    redis.call('SET', key, fresh, 'PX', ARGV[2])
  end
end
return current_generation(prefix)

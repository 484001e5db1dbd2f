-- ARGV[1] prefix. Returns the current generation as a decimal string.
-- Runs after prelude.lua (scripts.py joins them).
return current_generation(ARGV[1])

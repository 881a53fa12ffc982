-- wrk script for the "cold" scenarios: every request carries the next token of a file
-- (one JWT per line, minted beforehand by bench/run.py), cycling when the file is used up.
--
--   wrk ... -s bench/tokens.lua http://127.0.0.1:PORT/ -- /path/to/tokens.txt
--
-- The requests are formatted once in init(), so the per-request Lua work is a table lookup.
-- wrk gives each thread its own Lua state: with -t1 the connections share one counter.

local requests = {}
local count = 0
local next_index = 0

function init(args)
   local path = args[1]
   if path == nil then
      error("tokens.lua: pass the token file after --")
   end
   for line in io.lines(path) do
      if #line > 0 then
         count = count + 1
         requests[count] = wrk.format("GET", wrk.path, { ["Authorization"] = "Bearer " .. line })
      end
   end
   if count == 0 then
      error("tokens.lua: no tokens in " .. path)
   end
end

function request()
   next_index = next_index % count + 1
   return requests[next_index]
end

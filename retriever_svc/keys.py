"""The retriever's Redis key names and the Lua scripts that touch one user's keys atomically.

The layout, and the bound of every key, is documented in ``store.py`` (which owns all Redis I/O);
this module only names the keys and holds the scripts' text, so ``store.py`` stays readable.
"""

from __future__ import annotations

# The field of P:{u:<id>}:emb holding the user's history change counter. Embedding versions start
# with a letter or digit (``exitrank.limits.version_problem``), so no version can take this name.
SEQ_FIELD = ":seq"
HISTORY_PER_USER = 500  # interactions kept per user by default (index.history_per_user)

# Apply one event (user, item): keep the event with the larger (timestamp_ms, rating), then keep the
# newest ARGV[4] items only (the oldest, ties by item id, are evicted with their ratings). Returns 1
# when the user's history changed (and counts the change in the emb hash's SEQ_FIELD), else 0: a
# re-applied event, an older one, or a new one older than every item of a full history changes
# nothing, so nothing is re-folded. KEYS: hist, rating, emb. ARGV: item, rating, ts, cap, seq field.
APPLY_LUA = """
local cur = redis.call('ZSCORE', KEYS[1], ARGV[1])
local ts, rating = tonumber(ARGV[3]), tonumber(ARGV[2])
if cur then
  if tonumber(cur) > ts then return 0 end
  if tonumber(cur) == ts and tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '-1e308') >= rating then
    return 0
  end
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[4])
local self_evicted = false
if over > 0 then
  local evicted = redis.call('ZPOPMIN', KEYS[1], over)
  for j = 1, #evicted, 2 do
    if evicted[j] == ARGV[1] then self_evicted = true end
    redis.call('HDEL', KEYS[2], evicted[j])
  end
  -- a new item older than every item of a full history: added and evicted, nothing changed
  if self_evicted and not cur and over == 1 then return 0 end
end
if not self_evicted then redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end
redis.call('HINCRBY', KEYS[3], ARGV[5], 1)
return 1
"""

# The newest ARGV[1] interactions, oldest first, as ONE JSON string [[items], [ts], [ratings]]:
# one reply element instead of 3 per interaction (redis-py parses replies in Python: 225
# elements for GetContext's 5 x 15 cost more than the rest of the call). KEYS: hist, rating.
READ_LUA = """
local entries = redis.call('ZRANGE', KEYS[1], -tonumber(ARGV[1]), -1, 'WITHSCORES')
if #entries == 0 then return '[[],[],[]]' end
local ids, times = {}, {}
for j = 1, #entries, 2 do
  ids[#ids + 1] = entries[j]
  times[#times + 1] = entries[j + 1]
end
local ratings = redis.call('HMGET', KEYS[2], unpack(ids))
for j = 1, #ids do ratings[j] = ratings[j] or '1' end
return cjson.encode({ids, times, ratings})
"""

# A fold-in vector computed from the history at change count ARGV[3] is written only while the
# history is still at that count, so of two replicas folding in one user concurrently the one that
# saw the later history wins. KEYS: emb. ARGV: version, vector, seq, seq field.
PUT_VECTOR_LUA = """
if tonumber(redis.call('HGET', KEYS[1], ARGV[4]) or '0') ~= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# Admit ids into a bounded set atomically: a member stays admitted, a new id joins while the set holds
# fewer than ARGV[1]; returns 1/0 per id. KEYS: the set (P:{users}:all or P:{catalog}:items).
ADMIT_LUA = """
local limit, size, out = tonumber(ARGV[1]), redis.call('SCARD', KEYS[1]), {}
for j = 2, #ARGV do
  if redis.call('SISMEMBER', KEYS[1], ARGV[j]) == 1 then
    out[#out + 1] = 1
  elseif size < limit then
    redis.call('SADD', KEYS[1], ARGV[j])
    size = size + 1
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""


class Keys:
    """Key names of the layout in ``store.py``'s docstring."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.stream = f"{prefix}:{{stream}}:events"
        self.updates = f"{prefix}:{{updates}}:stream"
        self.users = f"{prefix}:{{users}}:all"
        self.current = f"{prefix}:{{emb}}:current"
        self.versions = f"{prefix}:{{emb}}:versions"
        self.catalog = f"{prefix}:{{catalog}}:version"
        self.catalog_items = f"{prefix}:{{catalog}}:items"
        self.probe = f"{prefix}:{{probe}}:write"

    def hist(self, user_id: str) -> str:
        return f"{self.prefix}:{{u:{user_id}}}:hist"

    def rating(self, user_id: str) -> str:
        return f"{self.prefix}:{{u:{user_id}}}:rating"

    def emb(self, user_id: str) -> str:
        return f"{self.prefix}:{{u:{user_id}}}:emb"

    def item(self, item_id: str) -> str:
        return f"{self.prefix}:{{i:{item_id}}}"

    def version(self, version: str) -> str:
        return f"{self.prefix}:{{emb}}:v:{version}"

    def version_users(self, version: str) -> str:
        return f"{self.prefix}:{{emb}}:v:{version}:users"

"""The multi-step queue operations, each one atomic Lua script.

Every key a script touches is passed in KEYS, and all of them carry one hash tag (the
model's, or an API key's), so each script runs within one Redis Cluster slot. Where a
script works on requests it cannot know in advance (CLAIM pops what is queued, REAP what is
leased), the caller first reads the candidate ids and passes each one's keys; the script
checks each candidate is still where it was read before acting on it. Liveness of gateways
and workers (keys in other slots) is read by the caller and passed as ARGV.
"""

from __future__ import annotations

from common.protocol import ORPHANED

TIE_STEP = 1 / 32
"""Score distance between requests of one priority queued in the same millisecond: scores
reach 10^14, where a double still tells 1/64 apart, so 32 arrivals fit in a millisecond
before they borrow from the next."""

ENQUEUE = """
-- KEYS: queue, req, wake, toks   ARGV: id, score, max_queued, ttl_s, field, value, ...
-- A request whose score another queued request already has (same priority, same
-- millisecond) is placed just after it, so arrival order holds within a millisecond too (Redis
-- orders equal scores by id); the score it got is the one stored in req:{id}. The id of a
-- finished request kept for resumption (its `final` field set) may be used again.
if redis.call('EXISTS', KEYS[2]) == 1 then
  if redis.call('HEXISTS', KEYS[2], 'final') == 0 then return -1 end
  redis.call('DEL', KEYS[2], KEYS[4])
end
local bound = tonumber(ARGV[3])
if bound > 0 and redis.call('ZCARD', KEYS[1]) >= bound then return 0 end
local score = tonumber(ARGV[2])
local exact = string.format('%.17g', score)  -- Lua's own number-to-string keeps 14 digits
while redis.call('ZCOUNT', KEYS[1], exact, exact) > 0 do
  score = score - """ + repr(TIE_STEP) + """
  exact = string.format('%.17g', score)
end
redis.call('HSET', KEYS[2], unpack(ARGV, 5))
redis.call('HSET', KEYS[2], 'score', exact)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
redis.call('ZADD', KEYS[1], exact, ARGV[1])
redis.call('LPUSH', KEYS[3], '1')
redis.call('LTRIM', KEYS[3], 0, 63)
return 1
"""
"""1 queued, 0 queue full, -1 the id is already in flight."""

CLAIM = """
-- KEYS: queue, leases, then req, toks, cancel of each candidate
-- ARGV: n, now_ms, lease_ms, worker_id, max_len, room, lacks, id...
-- Leases up to n of the candidate ids (the queue's head, highest score first, as the caller
-- read it), skipping any no longer queued, that this worker can start now:
--  * a request whose prompt + max_tokens (ctx) exceeds max_len, or that asks for a sampling
--    feature this worker's backend lacks (its `needs` mask meets `lacks`), stays queued for
--    another worker (skipped, so it blocks no one);
--  * the KV room is counted down by each request's prompt, already published tokens and one
--    more; the first request that does not fit ends the claim (it is not overtaken);
--  * cancelled or expired requests are removed and returned too, marked, so their streams
--    get a final event (not counted in n). (Requests of a dead gateway are leased; the
--    worker, which checks their gateways after the claim, ends them at once.)
local out = {}
local n, now, taken = tonumber(ARGV[1]), tonumber(ARGV[2]), 0
local max_len, room, lacks = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
for i = 8, #ARGV do
  if taken >= n then break end
  local id = ARGV[i]
  local base = 3 + 3 * (i - 8)
  local req, toks, cancel = KEYS[base], KEYS[base + 1], KEYS[base + 2]
  if redis.call('ZSCORE', KEYS[1], id) then
    local fields = redis.call('HGETALL', req)
    if #fields == 0 then
      redis.call('ZREM', KEYS[1], id)
    else
      local deadline = tonumber(redis.call('HGET', req, 'deadline_ms') or '0') or 0
      local dropped = ''
      if redis.call('EXISTS', cancel) == 1 then
        dropped = 'cancelled'
      elseif deadline > 0 and deadline <= now then
        dropped = 'deadline'
      end
      if dropped ~= '' then
        redis.call('ZREM', KEYS[1], id)
        table.insert(out, {id, fields, redis.call('LRANGE', toks, 0, -1), dropped})
        -- the worker publishes the final event and keeps the keys for the retention
        redis.call('DEL', cancel)
        redis.call('EXPIRE', req, 60)
        redis.call('EXPIRE', toks, 60)
      elseif (tonumber(redis.call('HGET', req, 'ctx') or '0') or 0) <= max_len
          and bit.band(tonumber(redis.call('HGET', req, 'needs') or '0') or 0, lacks) == 0 then
        local need = (tonumber(redis.call('HGET', req, 'plen') or '0') or 0)
                     + redis.call('LLEN', toks) + 1
        if need > room then return {out, 1} end
        room = room - need
        redis.call('ZREM', KEYS[1], id)
        redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), id)
        redis.call('HSET', req, 'worker', ARGV[4])
        table.insert(out, {id, fields, redis.call('LRANGE', toks, 0, -1), ''})
        taken = taken + 1
      end
    end
  end
end
return {out, 0}
"""
"""[[[id, [field, value, ...], [published token, ...], dropped], ...], full] where dropped is
'' for a claimed request, or 'cancelled' / 'deadline' for one removed instead of run, and
full is 1 when a request did not fit the room left (the claim ends there: none overtakes
it)."""

_HAND_BACK = """
-- Puts a leased request back in the queue with its original score; true when it was.
local function hand_back(queue, leases, req, id)
  redis.call('ZREM', leases, id)
  local score = redis.call('HGET', req, 'score')
  if not score then return false end
  redis.call('HDEL', req, 'worker')
  redis.call('ZADD', queue, score, id)
  return true
end
local function wake_workers(wake)
  redis.call('LPUSH', wake, '1')
  redis.call('LTRIM', wake, 0, 63)
end
"""

REQUEUE = _HAND_BACK + """
-- KEYS: queue, leases, wake, then req of each id   ARGV: id, ...
-- Hands a draining worker's requests back; returns how many.
local done = 0
for i, id in ipairs(ARGV) do
  if hand_back(KEYS[1], KEYS[2], KEYS[3 + i], id) then done = done + 1 end
end
if done > 0 then wake_workers(KEYS[3]) end
return done
"""

REAP = _HAND_BACK + """
-- KEYS: leases, queue, wake, then req of each candidate
-- ARGV: now_ms, n_dead, dead worker..., id...
-- Re-queues each candidate still leased whose lease expired (its worker died or stalled),
-- or whose worker the caller found without a registration: a dead worker's requests go
-- back within seconds, without waiting out their leases. Returns how many.
local now, n_dead = tonumber(ARGV[1]), tonumber(ARGV[2])
local dead = {}
for i = 3, 2 + n_dead do dead[ARGV[i]] = true end
local done = 0
for i = 3 + n_dead, #ARGV do
  local id = ARGV[i]
  local req = KEYS[4 + i - 3 - n_dead]
  local expiry = redis.call('ZSCORE', KEYS[1], id)
  if expiry and (tonumber(expiry) <= now
                 or dead[redis.call('HGET', req, 'worker') or '']) then
    if hand_back(KEYS[2], KEYS[1], req, id) then done = done + 1 end
  end
end
if done > 0 then wake_workers(KEYS[3]) end
return done
"""

CANCEL = """
-- KEYS: queue, req, toks, cancel   ARGV: id, cancel_ttl_s
-- 1: removed from the queue; 2: running, flagged for its worker; 0: unknown or finished.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('DEL', KEYS[2], KEYS[3])
  return 1
end
if redis.call('EXISTS', KEYS[2]) == 1 and redis.call('HEXISTS', KEYS[2], 'final') == 0 then
  redis.call('SET', KEYS[4], '1', 'EX', tonumber(ARGV[2]))
  return 2
end
return 0
"""

ADOPT = """
-- KEYS: req, toks, queue, wake   ARGV: gateway_id, id, ttl_s
-- A client resumes a request at this gateway: an unfinished one's events go to this gateway's
-- stream from now on. One its worker stopped because its gateway's registration lapsed
-- (final event 'orphaned') is queued again with its original score, its published tokens
-- kept (a worker continues from them), and its keys live as long as a new request's.
-- Returns {fields, published tokens, revived (1 or 0)}, or nil for an unknown id (never
-- seen, or finished longer ago than the retention).
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
local final = redis.call('HGET', KEYS[1], 'final')
local revived = 0
if not final then
  redis.call('HSET', KEYS[1], 'gateway', ARGV[1])
else
  local ok, events = pcall(cjson.decode, final)
  local score = redis.call('HGET', KEYS[1], 'score')
  if ok and type(events) == 'table' and type(events[1]) == 'table'
      and events[1]['f'] == '""" + ORPHANED + """' and score then
    redis.call('HDEL', KEYS[1], 'final', 'worker')
    redis.call('HSET', KEYS[1], 'gateway', ARGV[1])
    redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
    if redis.call('EXISTS', KEYS[2]) == 1 then
      redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
    end
    redis.call('ZADD', KEYS[3], score, ARGV[2])
    redis.call('LPUSH', KEYS[4], '1')
    redis.call('LTRIM', KEYS[4], 0, 63)
    revived = 1
  end
end
return {redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, -1), revived}
"""

STREAM_SLOT = """
-- KEYS: kstreams   ARGV: member, ttl_ms, limit
-- Takes one of an API key's stream slots (fleet-wide) unless `limit` are held; a slot not
-- renewed within ttl_ms (its gateway died) is free again. Returns 1, or 0 at the limit.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

RENEW_STREAM_SLOTS = """
-- KEYS: kstreams   ARGV: ttl_ms, member, ...
-- Keeps a gateway's open slots of one API key alive (a slot already freed stays free).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

REGISTER_GATEWAY = """
-- KEYS: gateway, replies   ARGV: ttl_s, replies_ttl_s, field, value, ...
-- A gateway's heartbeat: its registration, written whole with its TTL in one step (so a
-- registration never outlives its gateway), and its reply stream's TTL refreshed.
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
return 1
"""

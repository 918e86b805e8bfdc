-- The email queue's server side: every operation that must be atomic, dispatched on ARGV[1].
-- All KEYS belong to one queue and share one Cluster slot; an enqueue passes only the first five.
-- Job JSON is never re-encoded here (cjson would rewrite numbers and empty arrays): payloads are
-- read with cjson and stored as is.
local HIGH, NORMAL, LOW = KEYS[1], KEYS[2], KEYS[3]
local SCHED, IDS = KEYS[4], KEYS[5]
local ACTIVE, LEASES, DELIV = KEYS[6], KEYS[7], KEYS[8]
local DONE, DEAD, DEADJOBS = KEYS[9], KEYS[10], KEYS[11]
local PAYLOADS = KEYS[12]
local LISTS = { high = HIGH, normal = NORMAL, low = LOW }
local ORDER = { HIGH, NORMAL, LOW }
local NAMES = { 'high', 'normal', 'low' }
-- A pushed job due further ahead than this is refused at fetch (366 days, in ms).
local FAR_AHEAD_MS = 31622400000

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function list_of(prio)
  local key = LISTS[prio]
  if not key then
    return redis.error_reply('ERR email-queue: unknown priority ' .. tostring(prio))
  end
  return key
end

-- The top-level `id` and `scheduledAt` of a job without decoding it, when that can be done
-- exactly: decoding costs more than the rest of a fetch does per job. The payload must start with
-- `{"id":"`, the id must hold no escape, no `\u0040`..`\u007f` escape may follow it, and the
-- string `"id"` must not occur again (a duplicate
-- key, a nested one, or one with a space before its colon leaves the answer to the decoder). A key match comes before any `{` of a nested
-- object, so it is a top-level key: inside a string every quote is escaped and the plain pattern
-- cannot match unless preceded by a backslash, and arrays hold no keys. `scheduledAt` must be a
-- plain integer, occur once (as the string `"scheduledAt"` at all), not after a backslash, and
-- occur before any `{`. Anything else is decoded. The serializer of `EmailJob` writes `id`
-- first and `scheduledAt` before `metadata`, so its payloads take this path unless a `{` in the
-- addresses, subject or body, or a member named `id` inside `metadata`, sends them to the
-- decoder (same result, more server time).
-- Marks a scan result whose id is ASCII. A table key no decoded JSON can hold (its keys are
-- strings), so a payload member cannot fake it.
local ASCII = {}

local function scan(payload)
  -- Each string function call costs about as much as the search it makes, so every step that
  -- can be one pattern match is one.
  -- The id must be ASCII here: the fetch then needs no UTF-8 check of it (see the fetch).
  local id = string.match(payload, '^{"id":"([^"\\\128-\255]*)"')
  if not id then
    return nil
  end
  local close = 8 + #id
  if string.find(payload, '"id"', close, true) then
    return nil
  end
  -- `\u0040`..`\u007f` may spell a letter of a key (`"sch\u0065duledAt"` is `scheduledAt` to a
  -- decoder): only the decoder reads such a payload. (Serializers escape no ASCII letters.)
  -- A plain search and a byte test: a pattern search costs more than the rest of this scan.
  local escape = string.find(payload, '\\u00', close, true)
  while escape do
    local digit = string.byte(payload, escape + 4)
    if digit and digit >= 52 and digit <= 55 then
      return nil
    end
    escape = string.find(payload, '\\u00', escape + 1, true)
  end
  local at = nil
  local key, key_end = string.find(payload, '"scheduledAt":', close, true)
  local brace = string.find(payload, '{', 2, true)
  if key then
    -- A backslash (byte 92) before the match means its quote is escaped: the text sits inside
    -- a longer key (`"x \"scheduledAt":`), not the top-level one.
    if (brace and brace < key) or string.byte(payload, key - 1) == 92
      or string.find(payload, '"scheduledAt"', key_end, true) then
      return nil
    end
    local digits = string.match(payload, '^(%-?%d+)[,}]', key_end + 1)
    if not digits then
      return nil
    end
    at = tonumber(digits)
  elseif brace or string.find(payload, '"scheduledAt"', close, true) then
    -- Absent at the top level, inside a nested object, or written with a space before its
    -- colon: only the decoder can tell.
    return nil
  end
  return { id = id, scheduledAt = at, [ASCII] = true }
end

local function inspect(payload)
  local fields = scan(payload)
  if fields then
    return fields
  end
  local ok, job = pcall(cjson.decode, payload)
  if ok and type(job) == 'table' then
    return job
  end
  return nil
end

-- Whether `s` is valid UTF-8 (no overlong forms, surrogates or code points past U+10FFFF).
local function utf8_valid(s)
  local i, n = 1, #s
  while i <= n do
    local c = string.byte(s, i)
    local len
    if c < 128 then
      len = 1
    elseif c >= 194 and c <= 223 then
      len = 2
    elseif c >= 224 and c <= 239 then
      len = 3
    elseif c >= 240 and c <= 244 then
      len = 4
    else
      return false
    end
    if i + len - 1 > n then
      return false
    end
    for j = i + 1, i + len - 1 do
      local cc = string.byte(s, j)
      if cc < 128 or cc > 191 then
        return false
      end
    end
    local c2 = string.byte(s, i + 1)
    if (c == 224 and c2 < 160) or (c == 237 and c2 > 159) or (c == 240 and c2 < 144)
      or (c == 244 and c2 > 143) then
      return false
    end
    i = i + len
  end
  return true
end

-- Lowercase hex of `s`, formatted 1024 bytes per call.
local function to_hex(s)
  local parts = {}
  for i = 1, #s, 1024 do
    local j = math.min(i + 1023, #s)
    parts[#parts + 1] = string.format(string.rep('%02x', j - i + 1), string.byte(s, i, j))
  end
  return table.concat(parts)
end

-- Payloads up to this size that are not UTF-8 are stored as hex; a larger one is stored as it
-- is (exact, but the record is then not UTF-8 and is listed as `unreadable`): hex-encoding
-- megabytes would hold the server for about 0.2 s per MiB.
local HEX_MAX = 1048576

-- A dead record of a burial by this script. The payload is kept as the string `raw`, never
-- embedded as `job`: cjson accepts text that is not JSON to other decoders (NaN, 0x10, raw
-- control characters), and an embedded one would make the whole record unreadable. Readers
-- decode `raw` as the job. A payload that is not UTF-8 is kept as `rawHex` instead, so that the
-- record stays valid JSON. Burials are rare; these checks cost nothing on the hot path.
local function record(id, reason, err, prio, payload, now)
  local r = '{"id":' .. cjson.encode(id) .. ',"reason":' .. cjson.encode(reason)
    .. ',"error":' .. cjson.encode(err) .. ',"failedAt":' .. string.format('%d', now)
    .. ',"priority":' .. cjson.encode(prio)
  if #payload <= HEX_MAX and string.find(payload, '[\128-\255]') and not utf8_valid(payload) then
    return r .. ',"rawHex":"' .. to_hex(payload) .. '"}'
  end
  return r .. ',"raw":' .. cjson.encode(payload) .. '}'
end

-- `base`, or `base-2`, `base-3`, .. when a dead entry of that name exists: two copies buried
-- in the same millisecond keep an entry each.
-- The next suffix to try per base in this call: copies buried within one call share the
-- millisecond, and scanning from `-2` again for each would cost the k-th copy k lookups.
local next_suffix = {}

local function unique_dead_id(base)
  local n = next_suffix[base]
  if not n then
    if redis.call('HEXISTS', DEADJOBS, base) == 0 then
      next_suffix[base] = 2
      return base
    end
    n = 2
  end
  while redis.call('HEXISTS', DEADJOBS, base .. '-' .. n) == 1 do
    n = n + 1
  end
  next_suffix[base] = n + 1
  return base .. '-' .. n
end

-- A job id that is taken as a dead id (a raw push of a job that is already dead bypasses the
-- idempotency set, and its copy may die too) gets a name of its own, `<id>#again-<ms>`:
-- overwriting would lose the first record, which stays replayable under the job id.
local function file_dead(id, rec, now)
  redis.call('ZADD', DEAD, now, id)
  redis.call('HSET', DEADJOBS, id, rec)
  redis.call('SADD', IDS, id)
end

local function bury(id, rec, now)
  if redis.call('HEXISTS', DEADJOBS, id) == 1 then
    id = unique_dead_id(id .. '#again-' .. string.format('%d', now))
  end
  file_dead(id, rec, now)
end

-- A payload no job id can be read from goes under `malformed-<sha1 of the payload>`: the name
-- says what the record holds, so a burial of the same payload overwrites it, and a producer
-- pushing the same garbage again fills no extra entries. (A job whose own id merely starts
-- with `malformed-` goes through `bury` like any other.)
local bury_malformed = file_dead

-- Calls `f` with consecutive slices of `list` of at most `size` elements: `unpack` of a long
-- list would overflow the Lua stack.
local function each_chunk(list, size, f)
  local n = #list
  for i = 1, n, size do
    local chunk = {}
    for j = i, math.min(i + size - 1, n) do
      chunk[#chunk + 1] = list[j]
    end
    f(chunk)
  end
end

-- `command key args..` over `args` in chunks (an even size keeps score-member pairs together).
local function variadic(command, key, args)
  each_chunk(args, 1000, function(chunk)
    redis.call(command, key, unpack(chunk))
  end)
end

-- The list below list `above` whose aged head (see the fetch) waited longest, or nil; on a tie
-- the lower list, as the fetch's own check of the heads decides.
local function oldest_aged(aged, above)
  local pick, pick_at = nil, nil
  for j = 3, above + 1, -1 do
    if aged[j] and (pick == nil or aged[j] < pick_at) then
      pick, pick_at = j, aged[j]
    end
  end
  return pick
end

-- Puts `run[from..]`, popped from the head (right end) of `list`, back where it was, in order.
local function put_back(list, run, from)
  local back = {}
  for i = #run, from, -1 do
    back[#back + 1] = run[i]
  end
  variadic('RPUSH', list, back)
end

-- Removes members from a retention ZSET, its record hash and the known ids.
local function forget(zkey, hkey, members)
  variadic('ZREM', zkey, members)
  if hkey then
    variadic('HDEL', hkey, members)
  end
  variadic('SREM', IDS, members)
  return #members
end

-- Bounded retention: at most max_count members, none older than max_age ms. At most `limit`
-- members go per call so that one call never blocks the server for long.
local function trim(zkey, hkey, max_count, max_age, now, limit)
  local removed = 0
  if max_age >= 0 then
    removed = forget(zkey, hkey,
      redis.call('ZRANGEBYSCORE', zkey, '-inf', '(' .. string.format('%d', now - max_age),
        'LIMIT', 0, limit))
  end
  local excess = math.min(redis.call('ZCARD', zkey) - max_count, limit - removed)
  if excess > 0 then
    removed = removed + forget(zkey, hkey, redis.call('ZRANGE', zkey, 0, excess - 1))
  end
  return removed
end

-- A lease value is `<token>|<priority>`; the leased job's payload is in PAYLOADS under its id.
-- Kept apart so that the token checks of every settlement and extension read a few bytes, not
-- the job: each string that enters Lua is hashed over its whole length. Leases written by
-- earlier versions held the payload too (`<token>|<priority>|<payload>`) and are still read, so
-- that their jobs survive an upgrade. Returns the priority and the payload (nil if gone).
local function leased_job(id, lease)
  local a = string.find(lease, '|', 1, true)
  local b = string.find(lease, '|', a + 1, true)
  if b then
    return string.sub(lease, a + 1, b - 1), string.sub(lease, b + 1)
  end
  return string.sub(lease, a + 1), redis.call('HGET', PAYLOADS, id)
end

local function drop_lease(id)
  redis.call('HDEL', LEASES, id)
  redis.call('HDEL', PAYLOADS, id)
  redis.call('ZREM', ACTIVE, id)
end

-- A leased job back to the head of its list with its delivery undone; a count back at 0 goes
-- (no field means none). The caller drops the lease.
local function release_lease(id, lease)
  local prio, payload = leased_job(id, lease)
  if payload then
    redis.call('RPUSH', LISTS[prio], payload)
  end
  if redis.call('HINCRBY', DELIV, id, -1) <= 0 then
    redis.call('HDEL', DELIV, id)
  end
end

local op = ARGV[1]

if op == 'enqueue' then
  -- ARGV: op, then (id, priority, payload, due ms or 0) per job. Reply: 1 new / 0 known, per job.
  -- The clock is read only when a job carries a due time: TIME is a server call of its own.
  local now = nil
  local out = {}
  for i = 2, #ARGV, 4 do
    local id, prio, payload, due = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
    local list = list_of(prio)
    if type(list) == 'table' then return list end
    if redis.call('SADD', IDS, id) == 1 then
      if due > 0 and now == nil then now = now_ms() end
      if due > 0 and due > now then
        redis.call('ZADD', SCHED, due, prio .. '|' .. payload)
      else
        redis.call('LPUSH', list, payload)
      end
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  end
  return out
end

if op == 'work' then
  -- ARGV: op, token, fetch, visibility ms, aging ms, ttl ms, max deliveries, completed max,
  -- completed age ms, dead max, dead age ms, maintain (1/0), settle count, whether this
  -- worker's last pick was an aged one (1/0), then per settlement: kind, id, token, and for a retry its due ms, priority and payload, for a dead
  -- its record (each argument costs the call about a microsecond, so acks carry no padding).
  -- Reply: per settlement 1 applied / 0 lease lost; the leased jobs (id, payload, priority,
  -- delivery); whether the last pick was aged (1/0); whether more jobs may be waiting though
  -- fewer than `fetch` were leased (1/0: the call's pop budget ran out).
  -- Maintenance (lease recovery, promotion of due jobs, retention trims) costs a handful of
  -- server calls whether or not there is anything to do, so workers ask for it at most every
  -- few tens of milliseconds instead of on every call.
  local token, fetch = ARGV[2], tonumber(ARGV[3])
  local visibility, aging, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  local max_deliveries = tonumber(ARGV[7])
  local done_max, done_age = tonumber(ARGV[8]), tonumber(ARGV[9])
  local dead_max, dead_age = tonumber(ARGV[10]), tonumber(ARGV[11])
  local maintain = ARGV[12] == '1'
  local settles = tonumber(ARGV[13])
  local last_aged = ARGV[14] == '1'
  local now = now_ms()
  -- Scores as decimal strings, formatted once per call: a Lua number passed to redis.call is
  -- formatted with `%.17g` every time, which costs more than the ZADD entry it feeds.
  local now_score = string.format('%d', now)
  local deadline_score = string.format('%d', now + visibility)
  -- Delivery counts are written only while some job has been delivered before (recovered or
  -- released): with no count anywhere, settlements have none to remove and every job leased
  -- now is on its first delivery, needing no per-job HINCRBY. Recovery creates the count of a
  -- job it puts back.
  local counting = redis.call('EXISTS', DELIV) == 1

  -- 1. Settle finished deliveries. A settlement applies only while its lease is still held.
  -- The structures every settlement touches are read and written with one variadic command
  -- each rather than one command per job: each server call from Lua has a fixed cost.
  local settled = {}
  if settles > 0 then
    local ids = {}
    local bases = {}
    local base = 15
    for s = 1, settles do
      bases[s] = base
      ids[s] = ARGV[base + 1]
      local kind = ARGV[base]
      base = base + 3 + (kind == 'retry' and 3 or kind == 'dead' and 1 or 0)
    end
    local leases = {}
    each_chunk(ids, 1000, function(chunk)
      for _, lease in ipairs(redis.call('HMGET', LEASES, unpack(chunk))) do
        leases[#leases + 1] = lease
      end
    end)
    local seen, dropped, finished, done = {}, {}, {}, {}
    for s = 1, settles do
      local base = bases[s]
      local kind, id, tok = ARGV[base], ARGV[base + 1], ARGV[base + 2]
      local lease = leases[s]
      if lease and not seen[id] and string.sub(lease, 1, #tok + 1) == tok .. '|' then
        seen[id] = true
        dropped[#dropped + 1] = id
        if kind == 'ack' then
          finished[#finished + 1] = id
          if done_max > 0 then
            done[#done + 1] = now_score
            done[#done + 1] = id
          else
            redis.call('SREM', IDS, id)
          end
        elseif kind == 'retry' then
          -- due ms, priority, payload with the attempt counted
          finished[#finished + 1] = id
          redis.call('ZADD', SCHED, tonumber(ARGV[base + 3]), ARGV[base + 4] .. '|' .. ARGV[base + 5])
        elseif kind == 'dead' then
          -- the dead record JSON
          finished[#finished + 1] = id
          bury(id, ARGV[base + 3], now)
        elseif kind == 'release' then
          release_lease(id, lease)
        end
        settled[#settled + 1] = 1
      else
        settled[#settled + 1] = 0
      end
    end
    variadic('HDEL', LEASES, dropped)
    variadic('HDEL', PAYLOADS, dropped)
    variadic('ZREM', ACTIVE, dropped)
    if counting then
      variadic('HDEL', DELIV, finished)
    end
    variadic('ZADD', DONE, done)
  end

  -- 2. Leases past their deadline: the worker died or hung. Back to the head of their list,
  -- or to the dead set once delivered max_deliveries times.
  local expired = maintain and redis.call('ZRANGEBYSCORE', ACTIVE, '-inf', now, 'LIMIT', 0, 100)
    or {}
  for _, id in ipairs(expired) do
    local lease = redis.call('HGET', LEASES, id)
    local prio, payload = nil, nil
    if lease then
      prio, payload = leased_job(id, lease)
    end
    drop_lease(id)
    -- A lease whose payload was deleted by hand has no job left to put back.
    if payload then
      -- A leased job without a count is on its first delivery (see `counting` above).
      local counted = tonumber(redis.call('HGET', DELIV, id))
      local d = counted or 1
      if d >= max_deliveries then
        redis.call('HDEL', DELIV, id)
        bury(id, record(id, 'abandoned', 'lease expired after ' .. d .. ' deliveries', prio,
          payload, now), now)
      else
        if not counted then
          redis.call('HSET', DELIV, id, 1)
          counting = true
        end
        redis.call('RPUSH', LISTS[prio], payload)
      end
    end
  end

  -- 3. Due scheduled jobs (delayed and retries) join the tail of their list.
  local due = maintain and redis.call('ZRANGEBYSCORE', SCHED, '-inf', now, 'LIMIT', 0, 500) or {}
  for _, member in ipairs(due) do
    redis.call('ZREM', SCHED, member)
    local bar = string.find(member, '|', 1, true)
    local list = bar and LISTS[string.sub(member, 1, bar - 1)]
    if list then
      redis.call('LPUSH', list, string.sub(member, bar + 1))
    else
      bury_malformed('malformed-' .. redis.sha1hex(member),
        record('malformed-' .. redis.sha1hex(member), 'malformed', 'schedule entry without priority',
          'normal', member, now), now)
    end
  end

  -- 4. Fetch: strict priority, except that a lower list's head waiting longer than `aging` is
  -- served: aged picks and strict picks alternate (the flag `last_aged` carries the alternation
  -- from one call of the worker to its next), so an aged backlog of low jobs is served at half
  -- the pace without holding up higher priorities, and among aged heads the longest waiting
  -- goes first. Jobs are popped in runs from the first non-empty list (`LMPOP .. RIGHT COUNT
  -- <n>`); then the heads of the lower lists are checked for age. The first time an aged pick
  -- is due, the run goes back to the tail it came from (the script is atomic, so nobody sees it
  -- move) and the aged head is taken instead. From then on each step costs one command: an
  -- aged head already found is popped directly (`RPOP`), and right after an aged pick one job
  -- is popped in strict order (`COUNT 1`). Within one call a list found empty stays empty
  -- (nothing here pushes to a list but the put-back of what was just popped from it) and a head
  -- checked for age stays the head until its list is popped, so the jobs taken are exactly what
  -- taking them one at a time would give. `heads[j]` keeps the decoded head of list j, so the
  -- job popped from it is not decoded twice. The deadline, the known id and the payload of every
  -- leased job are written with one variadic command each after the loop.
  local out = {}
  local empty, aged, heads = {}, {}, {}
  local deadlines, known, payloads = {}, {}, {}
  -- `examined` counts every job popped, leased or not: a backlog of jobs that are buried or
  -- parked instead of leased (expired after an outage, malformed, due later) must not keep one
  -- call popping until the list is empty. Past the budget the call returns what it has and
  -- says that more may be waiting, and the worker calls again at once.
  -- Reads whether list j's head is aged, unless already known (`aged[j]`: the head's
  -- `scheduledAt` when it is aged, false when not, nil: not checked).
  local function check_head(j)
    if not empty[j] and aged[j] == nil then
      local head = redis.call('LINDEX', ORDER[j], -1)
      if head then
        local job = inspect(head)
        heads[j] = job or false
        local at = job and type(job.scheduledAt) == 'number' and job.scheduledAt
        aged[j] = (at and at > 0 and now - at > aging) and at or false
      else
        empty[j] = true
      end
    end
  end
  local fetched, guard, examined = 0, 0, 0
  local budget = 2 * fetch + 100
  while fetched < fetch and guard < budget and examined < budget do
    guard = guard + 1
    local idx, run = nil, nil
    local want = fetch - fetched
    local drained = false
    local cached = (aged[2] or aged[3]) and oldest_aged(aged, 0)
    if cached and not last_aged then
      -- A call taking one job would serve a head as aged only below the first non-empty list:
      -- a higher list emptied since the head was checked makes its list the strict one.
      local top = nil
      for j = 1, cached - 1 do
        if not empty[j] then
          if redis.call('LLEN', ORDER[j]) > 0 then
            top = j
            break
          end
          empty[j] = true
        end
      end
      if top then
        -- And it would check every head below that list, not only those checked so far.
        for j = top + 1, 3 do
          check_head(j)
        end
        cached = oldest_aged(aged, top)
      else
        cached = nil
      end
    end
    if cached and not last_aged then
      -- An aged head found earlier in this call is due: take it without popping a run. Its
      -- list has not been popped since, so it is still that list's head.
      idx = cached
      local head = redis.call('RPOP', ORDER[idx])
      run = head and { head } or {}
      last_aged = true
    else
      -- Right after an aged pick only one job is kept, so only one is popped.
      if cached then
        want = 1
      end
      -- LMPOP pops from the first non-empty list of those not yet found empty: one call where
      -- trying each list in turn would spend one on every empty higher list.
      local args = { 0 }
      for j = 1, 3 do
        if not empty[j] then
          args[#args + 1] = ORDER[j]
        end
      end
      args[1] = #args - 1
      if args[1] == 0 then
        break
      end
      args[#args + 1] = 'RIGHT'
      args[#args + 1] = 'COUNT'
      args[#args + 1] = want
      local popped = redis.call('LMPOP', unpack(args))
      for j = 1, 3 do
        if not empty[j] then
          if popped and ORDER[j] == popped[1] then
            idx = j
            run = popped[2]
            break
          end
          empty[j] = true
        end
      end
      if not run then
        break
      end
      drained = #run < want
      if aging > 0 then
        local pick, pick_at = nil, nil
        for j = 3, idx + 1, -1 do
          check_head(j)
          if aged[j] and (pick == nil or aged[j] < pick_at) then
            pick, pick_at = j, aged[j]
          end
        end
        if pick and not last_aged then
          put_back(ORDER[idx], run, 1)
          drained = false
          run = { redis.call('RPOP', ORDER[pick]) }
          idx = pick
          last_aged = true
        else
          if pick and #run > 1 then
            put_back(ORDER[idx], run, 2)
            drained = false
            run = { run[1] }
          end
          last_aged = false
        end
      end
    end
    if drained then
      empty[idx] = true
    end
    local prio = NAMES[idx]
    examined = examined + #run
    for n, payload in ipairs(run) do
      local job = nil
      if n == 1 then
        job = heads[idx]
      end
      if job == nil then
        job = inspect(payload)
      elseif job == false then
        job = nil
      end
      local id = job and job.id
      -- An id that is not UTF-8 could never be settled (workers hold ids as text), so such a
      -- job is buried here instead of being leased. The scan only takes ASCII ids, so only a
      -- decoded id is checked, and fully only when a byte past 127 shows up.
      if type(id) ~= 'string' or id == '' or string.len(id) > 256
        or (not job[ASCII] and string.find(id, '[\128-\255]') and not utf8_valid(id)) then
        local mid = 'malformed-' .. redis.sha1hex(payload)
        bury_malformed(mid, record(mid, 'malformed',
          'not a JSON object with a non-empty UTF-8 string id of at most 256 bytes', prio,
          payload, now), now)
      else
        -- A number only: `"scheduledAt":"123"` is not a time (the worker's decoder refuses it).
        local at = type(job.scheduledAt) == 'number' and job.scheduledAt or 0
        if at > now + FAR_AHEAD_MS then
          -- Only a raw push gets here with such a time (the crate's own delayed jobs wait in
          -- the schedule and arrive due): seconds or microseconds taken for ms, or garbage.
          -- Parked in the schedule it would wait, unseen by the TTL, for centuries.
          local mid = 'malformed-' .. redis.sha1hex(payload)
          bury_malformed(mid, record(mid, 'malformed', 'scheduledAt ' .. string.format('%.0f', at)
            .. ' is more than a year ahead (ms since the epoch expected)', prio, payload, now),
            now)
        elseif at > now + 1000 then
          redis.call('ZADD', SCHED, at, prio .. '|' .. payload)
        elseif ttl > 0 and at > 0 and now - at > ttl then
          -- A job recovered or released earlier has a delivery count; it goes with the job.
          -- When another copy of the id holds a lease, the count is that copy's, and this copy
          -- is filed as a duplicate: replaying it would send the mail twice.
          local did = id
          if redis.call('HEXISTS', LEASES, id) == 0 then
            redis.call('HDEL', DELIV, id)
          else
            did = unique_dead_id(id .. '#duplicate-' .. string.format('%d', now))
          end
          bury(did, record(did, 'expired', 'waited ' .. string.format('%d', now - at)
            .. ' ms, longer than the ' .. string.format('%d', ttl) .. ' ms job TTL', prio, payload,
            now), now)
        elseif redis.call('HSETNX', LEASES, id, token .. '|' .. prio) == 0 then
          local did = unique_dead_id(id .. '#duplicate-' .. string.format('%d', now))
          bury(did, record(did, 'duplicate', 'a job with this id is being processed', prio,
            payload, now), now)
        else
          deadlines[#deadlines + 1] = deadline_score
          deadlines[#deadlines + 1] = id
          known[#known + 1] = id
          payloads[#payloads + 1] = id
          payloads[#payloads + 1] = payload
          local d = counting and redis.call('HINCRBY', DELIV, id, 1) or 1
          out[#out + 1] = { id, payload, prio, d }
          fetched = fetched + 1
        end
      end
    end
    heads[idx] = nil
    aged[idx] = nil
  end
  -- Payloads before deadlines: a script stopped by an error keeps what it wrote, and recovery,
  -- which finds leases by their deadline, must not find one whose job was never written.
  variadic('HSET', PAYLOADS, payloads)
  variadic('ZADD', ACTIVE, deadlines)
  variadic('SADD', IDS, known)

  -- 5. Bounded retention of completed ids and dead jobs. Between two maintenance calls a set
  -- may grow past its bound by what the workers finished in the meantime; 2000 per call is
  -- far above what one worker finishes between two of them.
  if maintain then
    trim(DONE, nil, done_max, done_age, now, 2000)
    trim(DEAD, DEADJOBS, dead_max, dead_age, now, 2000)
  end
  local more = fetched < fetch and (guard >= budget or examined >= budget)
  return { settled, out, last_aged and 1 or 0, more and 1 or 0 }
end

if op == 'extend' then
  -- ARGV: op, visibility ms, then (id, token) pairs. Reply: 1 extended / 0 lease lost, per job.
  local deadline = now_ms() + tonumber(ARGV[2])
  local out = {}
  for i = 3, #ARGV, 2 do
    local id, tok = ARGV[i], ARGV[i + 1]
    local lease = redis.call('HGET', LEASES, id)
    if lease and string.sub(lease, 1, #tok + 1) == tok .. '|' then
      redis.call('ZADD', ACTIVE, 'XX', deadline, id)
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  end
  return out
end

if op == 'replay' then
  -- ARGV: op, then (dead id, job id, priority, payload, SHA-1 of the record read). Reply:
  -- 1 replayed / 0 gone, per job. An entry whose record changed since it was read (replayed by
  -- another call, run and buried again under the same dead id) is another burial: it stays.
  local out = {}
  for i = 2, #ARGV, 5 do
    local did, id, prio, payload = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    local list = list_of(prio)
    if type(list) == 'table' then return list end
    local rec = redis.call('HGET', DEADJOBS, did)
    if rec and redis.sha1hex(rec) == ARGV[i + 4] and redis.call('ZREM', DEAD, did) == 1 then
      redis.call('HDEL', DEADJOBS, did)
      redis.call('HDEL', DELIV, id)
      redis.call('SADD', IDS, id)
      redis.call('LPUSH', list, payload)
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  end
  return out
end

if op == 'orphans' then
  -- ARGV: op, then tokens of work calls whose replies never reached their worker (a timeout,
  -- a lost connection). The worker holds none of the jobs leased under them, so they go back
  -- to the head of their lists with the delivery undone, as a release does, instead of waiting
  -- out their leases. Reads every lease: this runs only after such a failure. Reply: how many.
  local tokens = {}
  for i = 2, #ARGV do tokens[ARGV[i]] = true end
  local back = 0
  each_chunk(redis.call('ZRANGE', ACTIVE, 0, -1), 1000, function(chunk)
    local leases = redis.call('HMGET', LEASES, unpack(chunk))
    for i, id in ipairs(chunk) do
      local lease = leases[i]
      local bar = lease and string.find(lease, '|', 1, true)
      if bar and tokens[string.sub(lease, 1, bar - 1)] then
        -- Read before the lease goes: a lease may hold the payload's field.
        release_lease(id, lease)
        drop_lease(id)
        back = back + 1
      end
    end
  end)
  return back
end

if op == 'dead_page' then
  -- ARGV: op, the dead id the page follows ('' = from the oldest), count, byte budget. Reply:
  -- dead id, record (false when none), per member, oldest first, then 1 when the page was cut
  -- short by the budget, else 0. The rank and the reads are one step, so entries trimmed or
  -- replayed meanwhile cannot shift the page; a dead id no longer in the set starts it from
  -- the oldest again. Records are read 4 at a time until the budget is spent: a page of a
  -- thousand megabyte-sized jobs would otherwise be gigabytes in the server's memory at once.
  local start = 0
  if ARGV[2] ~= '' then
    local rank = redis.call('ZRANK', DEAD, ARGV[2])
    if rank then start = rank + 1 end
  end
  local ids = redis.call('ZRANGE', DEAD, start, start + tonumber(ARGV[3]) - 1)
  local budget = tonumber(ARGV[4])
  local out, bytes, i = {}, 0, 1
  while i <= #ids and bytes < budget do
    local chunk = {}
    for j = i, math.min(i + 3, #ids) do
      chunk[#chunk + 1] = ids[j]
    end
    local records = redis.call('HMGET', DEADJOBS, unpack(chunk))
    for k, id in ipairs(chunk) do
      out[#out + 1] = id
      out[#out + 1] = records[k]
      if records[k] then bytes = bytes + #records[k] end
    end
    i = i + #chunk
  end
  out[#out + 1] = i <= #ids and 1 or 0
  return out
end

if op == 'clean' then
  -- ARGV: op, 'completed' | 'dead', keep count, max age ms (-1: any age), limit. Reply: removed.
  local now = now_ms()
  local keep, age, limit = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
  if ARGV[2] == 'completed' then
    return trim(DONE, nil, keep, age, now, limit)
  end
  return trim(DEAD, DEADJOBS, keep, age, now, limit)
end

return redis.error_reply('ERR email-queue: unknown operation ' .. tostring(op))

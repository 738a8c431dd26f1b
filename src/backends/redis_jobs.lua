-- The Redis job store's operations, each atomic because it is one script call (see
-- redis_jobs.rs for the keys). ARGV[1] names the operation, ARGV[2] is the key prefix, and
-- the operation's own arguments follow. Job keys are built here, so the store needs a
-- standalone Redis (or one cluster slot), not a cluster.

local P = ARGV[2]
local Q = P .. ':queue'
local GROUP = 'workers'

local function jobkey(id) return P .. ':job:' .. id end

local function is_finished(status)
  return status == 'completed' or status == 'failed' or status == 'cancelled'
end

local function ensure_group()
  if redis.call('EXISTS', Q) == 0 then
    redis.call('XGROUP', 'CREATE', Q, GROUP, '0', 'MKSTREAM')
  end
end

local function set_status(key, from, to)
  redis.call('HSET', key, 'status', to)
  redis.call('HINCRBY', P .. ':counts', from, -1)
  redis.call('HINCRBY', P .. ':counts', to, 1)
end

-- What the job costs against the byte budget, as Job::stored_bytes counts it.
local function size(key, overhead)
  local f = redis.call('HMGET', key, 'content', 'result_bytes', 'error', 'id', 'user_id', 'notebook_id')
  return overhead + #f[1] + tonumber(f[2] or '0') + #(f[3] or '') + #f[4] + #f[5] + #f[6]
end

-- Stores the job's new size and adjusts the total.
local function resize(key, overhead)
  local new = size(key, overhead)
  local old = tonumber(redis.call('HGET', key, 'bytes'))
  redis.call('HSET', key, 'bytes', new)
  redis.call('INCRBY', P .. ':bytes', new - old)
end

-- Only finished jobs are forgotten, so no unfinished count changes.
local function forget(id)
  local key = jobkey(id)
  local f = redis.call('HMGET', key, 'user_id', 'status', 'bytes')
  if not f[1] then return end
  redis.call('DEL', key)
  for _, index in ipairs({':all', ':finished', ':expiry', ':queued'}) do
    redis.call('ZREM', P .. index, id)
  end
  redis.call('ZREM', P .. ':user:' .. f[1], id)
  redis.call('DECRBY', P .. ':bytes', f[3])
  redis.call('HINCRBY', P .. ':counts', f[2], -1)
end

local function evict_oldest_finished(keep)
  for _, id in ipairs(redis.call('ZRANGE', P .. ':finished', 0, 1)) do
    if id ~= keep then
      forget(id)
      return true
    end
  end
  return false
end

-- Forgets jobs finished longer than the retention period ago (a bounded batch per call).
local function sweep(now_ms, retention_ms)
  local expired = redis.call('ZRANGEBYSCORE', P .. ':expiry', '-inf', now_ms - retention_ms, 'LIMIT', 0, 100)
  for _, id in ipairs(expired) do forget(id) end
end

-- The bookkeeping of a job that just finished: its owner's unfinished count, the eviction and
-- expiry indexes, its content (needed only to run it), and its queue entry, acknowledged.
local function finish(key, id, user, seq, now_ms)
  if redis.call('HINCRBY', P .. ':unfinished', user, -1) <= 0 then
    redis.call('HDEL', P .. ':unfinished', user)
  end
  redis.call('ZADD', P .. ':finished', seq, id)
  redis.call('ZADD', P .. ':expiry', now_ms, id)
  redis.call('ZREM', P .. ':queued', id)
  redis.call('HSET', key, 'content', '')
  local entry = redis.call('HGET', key, 'entry')
  if entry then
    redis.call('XACK', Q, GROUP, entry)
    redis.call('XDEL', Q, entry)
  end
end

local ops = {}

-- ARGV: now_ms, retention_ms, max_per_user, max_jobs, max_bytes, size, id, user, fields...
function ops.create()
  ensure_group()
  sweep(tonumber(ARGV[3]), tonumber(ARGV[4]))
  local max_per_user, max_jobs, max_bytes = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
  local job_size, id, user = tonumber(ARGV[8]), ARGV[9], ARGV[10]
  if tonumber(redis.call('HGET', P .. ':unfinished', user) or '0') >= max_per_user then
    return {'user_at_limit'}
  end
  local function fits()
    return redis.call('ZCARD', P .. ':all') < max_jobs
      and tonumber(redis.call('GET', P .. ':bytes') or '0') + job_size <= max_bytes
  end
  while not fits() do
    if not evict_oldest_finished(nil) then
      return {'full', tostring(redis.call('ZCARD', P .. ':all')), redis.call('GET', P .. ':bytes') or '0'}
    end
  end
  local key = jobkey(id)
  local seq = redis.call('INCR', P .. ':seq')
  local fields = {}
  for i = 11, #ARGV do fields[#fields + 1] = ARGV[i] end
  redis.call('HSET', key, 'seq', seq, 'bytes', job_size, unpack(fields))
  redis.call('ZADD', P .. ':all', seq, id)
  redis.call('ZADD', P .. ':queued', seq, id)
  redis.call('ZADD', P .. ':user:' .. user, seq, id)
  redis.call('HINCRBY', P .. ':unfinished', user, 1)
  redis.call('HINCRBY', P .. ':counts', 'queued', 1)
  redis.call('INCRBY', P .. ':bytes', job_size)
  redis.call('HSET', key, 'entry', redis.call('XADD', Q, '*', 'job', id))
  redis.call('PUBLISH', P .. ':queued', id)
  return {'ok'}
end

-- ARGV: consumer, now. Takes the next entry of the queue for the consumer; entries of jobs no
-- longer queued (cancelled meanwhile) are acknowledged and skipped.
function ops.claim()
  ensure_group()
  while true do
    local read = redis.call('XREADGROUP', 'GROUP', GROUP, ARGV[3], 'COUNT', 1, 'STREAMS', Q, '>')
    if not read then return false end
    local entry = read[1][2][1]
    local entry_id, id = entry[1], entry[2][2]
    local key = jobkey(id)
    if redis.call('HGET', key, 'status') == 'queued' then
      set_status(key, 'queued', 'running')
      redis.call('ZREM', P .. ':queued', id)
      redis.call('HSET', key, 'worker', ARGV[3], 'entry', entry_id, 'updated_at', ARGV[4])
      return redis.call('HGETALL', key)
    end
    redis.call('XACK', Q, GROUP, entry_id)
    redis.call('XDEL', Q, entry_id)
  end
end

local function applied(key)
  local reply = {'applied'}
  for _, value in ipairs(redis.call('HGETALL', key)) do reply[#reply + 1] = value end
  return reply
end

-- ARGV: id, claimant ('' = any), now, now_ms, max_bytes, overhead, to, expected (comma
-- separated), has_result, result, result_bytes, has_error, error, retry_count ('' = same),
-- change (a token naming this change: sent again after a lost reply, it finds the change made).
function ops.update()
  local id = ARGV[3]
  local key = jobkey(id)
  local f = redis.call('HMGET', key, 'status', 'worker', 'user_id', 'seq', 'change')
  local status = f[1]
  if not status then return {'missing'} end
  if f[5] == ARGV[17] then return applied(key) end
  local expected = false
  for name in string.gmatch(ARGV[10], '[^,]+') do
    if name == status then expected = true end
  end
  if not expected then return {'refused', status} end
  if ARGV[4] ~= '' and f[2] ~= ARGV[4] then return {'lost', status} end
  local to = ARGV[9]
  if to ~= status then set_status(key, status, to) end
  if status == 'queued' and to ~= 'queued' then redis.call('ZREM', P .. ':queued', id) end
  redis.call('HSET', key, 'updated_at', ARGV[5], 'change', ARGV[17])
  if ARGV[11] == '1' then redis.call('HSET', key, 'result', ARGV[12], 'result_bytes', ARGV[13]) end
  if ARGV[14] == '1' then redis.call('HSET', key, 'error', ARGV[15]) end
  if ARGV[16] ~= '' then redis.call('HSET', key, 'retry_count', ARGV[16]) end
  if is_finished(to) and not is_finished(status) then
    finish(key, id, f[3], f[4], tonumber(ARGV[6]))
  end
  local overhead = tonumber(ARGV[8])
  resize(key, overhead)
  -- A large result may take the store past its budget: other finished jobs make room.
  while tonumber(redis.call('GET', P .. ':bytes')) > tonumber(ARGV[7]) and evict_oldest_finished(id) do end
  return applied(key)
end

-- ARGV: consumer, min_idle_ms ('' = sweep only), max_retries, now, now_ms, retention_ms,
-- overhead. Forgets the jobs past their retention, and takes over
-- the queue entries whose worker stopped renewing its claim (XAUTOCLAIM): a running job is
-- queued again with the interrupted attempt counted, or failed when its retries are spent.
-- Returns the jobs it changed.
function ops.requeue()
  ensure_group()
  sweep(tonumber(ARGV[7]), tonumber(ARGV[8]))
  local changed = {}
  if ARGV[4] == '' then return changed end
  local cursor = '0-0'
  for _ = 1, 10 do
    local reply = redis.call('XAUTOCLAIM', Q, GROUP, ARGV[3], ARGV[4], cursor, 'COUNT', 100)
    for _, entry in ipairs(reply[2]) do
      local entry_id, id = entry[1], entry[2][2]
      local key = jobkey(id)
      local f = redis.call('HMGET', key, 'status', 'retry_count', 'user_id', 'seq')
      redis.call('XACK', Q, GROUP, entry_id)
      redis.call('XDEL', Q, entry_id)
      if f[1] == 'running' then
        local retries = tonumber(f[2])
        redis.call('HSET', key, 'updated_at', ARGV[6])
        redis.call('HDEL', key, 'worker', 'entry')
        if retries >= tonumber(ARGV[5]) then
          set_status(key, 'running', 'failed')
          redis.call('HSET', key, 'error', 'interrupted by a server restart during attempt '
            .. (retries + 1) .. ', and no retries were left')
          finish(key, id, f[3], f[4], tonumber(ARGV[7]))
          resize(key, tonumber(ARGV[9]))
        else
          set_status(key, 'running', 'queued')
          redis.call('ZADD', P .. ':queued', f[4], id)
          redis.call('HSET', key, 'retry_count', retries + 1,
            'entry', redis.call('XADD', Q, '*', 'job', id))
          redis.call('PUBLISH', P .. ':queued', id)
        end
        changed[#changed + 1] = redis.call('HGETALL', key)
      end
    end
    cursor = reply[1]
    if cursor == '0-0' then break end
  end
  return changed
end

-- ARGV: consumer, ids... Resets the idle time of the consumer's entries of jobs it still runs,
-- so that no other process takes them over. Returns the ids of finished (or forgotten) jobs,
-- which need no more renewing; a job taken over stays the caller's concern until its worker's
-- update is refused.
function ops.renew()
  local finished = {}
  for i = 4, #ARGV do
    local f = redis.call('HMGET', jobkey(ARGV[i]), 'status', 'worker', 'entry')
    if f[1] == 'running' and f[2] == ARGV[3] and f[3] then
      redis.call('XCLAIM', Q, GROUP, ARGV[3], 0, f[3], 'JUSTID')
    elseif not f[1] or is_finished(f[1]) then
      finished[#finished + 1] = ARGV[i]
    end
  end
  return finished
end

return ops[ARGV[1]]()

"""The Lua script that changes the shared counters in Redis: one round trip, atomic, per check.

Called as `EVALSHA sha 0 op now_ms epoch args_json prefix`, or as `EVALSHA sha 0 batch - -
[[op, epoch, now_ms, args], ...] prefix`: the operations of many requests in one round trip,
each answered in order (one that fails is `{"error"}` and leaves the others alone).

Every replica process has an `epoch` (a random id, renewed after each outage);
`{prefix}epochs` holds each epoch's lease (a sorted set scored by the time it ends). Whatever
an epoch holds (requests in flight, budget reservations) lives in hash fields named by it, so
what a replica that died held is released by its lease running out: its slots are dropped and
its reservations charged in full, by whichever script next touches those counters.

Keys, under the prefix (a client's name and a budget's key are made of `[A-Za-z0-9._:-]`):

    c:{client}:rpm    sorted set: request id -> when it was admitted (ms)
    c:{client}:tpm    sorted set: "{request id}:{tokens}" -> when it ended
    c:{client}:tsum   the sum of the tokens in `tpm`
    c:{client}:par    hash: epoch -> requests in flight
    b:{budget}:spent  nano-dollars charged in the period (a budget key names its period)
    b:{budget}:res    hash: epoch -> nano-dollars reserved
    b:{budget}:seeded set once a replica has given `spent` what the period spent before it counted

Operations (`args`, a JSON object; amounts that go to INCRBY are strings of digits):

- `acquire` {c: {n, id, rpm, tpm, par}?, cb: budget?, pb: budget?}: the client's checks in
  the order max_parallel, rpm, tpm, budget (`cb`); if any refuses, nothing changes and the
  answer is `{"refused", limit, retry_ms, ...state}`. Otherwise the request is counted and
  `cb` reserved; then the provider's budget `pb` is reserved if it fits (`pb_ok`).
  A budget is `{k, limit, amount, exp}` (`exp`: ms when its counters may expire, 0: never).
- `reserve` {pb}: a provider's budget alone (a fallback candidate).
- `release` {k, amount}: a reservation given back uncharged (an attempt that failed).
- `settle` {c: {n, id, tok}?, b: [{k, r, c, exp}]}: the request ended: its slot freed, its
  tokens counted, each reservation `r` replaced by its cost `c`; a reservation whose epoch
  lost its lease meanwhile was charged in full already, and is left alone.
- `read` {clients: [n], keys: [k], renew?}: use now, and the live epochs (replicas); with
  `renew` the caller's lease is renewed first (the limiter's sync, every second).
- `reconcile` {old, keys: [...], clients: [...]}: after an outage, what this replica did
  meanwhile (see `Limiter._reconcile`).
- `seed` {keys: [{k, before, since, exp}]}: budgets a replica began counting (at its start, a
  new period, a change of the files): each is marked `seeded`, and raised to `since` (what the
  ledger holds of its period) if that is more. For a budget that came mid-run, `before` (what
  its subject spent in the period before the change) is added instead, by the first replica
  to mark it: every replica applies the change and asks, and it is added once.

Every operation but a plain `read` first renews the caller's lease; an epoch whose lease ran out
gets `{"lost": true}` and changes nothing (its holdings are, or will be, charged in full).
Answers are JSON strings (money as strings of digits): cjson.encode keeps them exact.
"""

from __future__ import annotations

SCRIPT = r"""
local P = ARGV[5]
local now, epoch
local EPOCHS = P .. 'epochs'
local WINDOW = 60000

local function int(x) return string.format('%d', x) end

local function lease(e)
  local s = redis.call('ZSCORE', EPOCHS, e)
  if not s then return nil end
  return tonumber(s)
end

local function live(e)
  local s = lease(e)
  return s ~= nil and s > now
end

local function budget(k)
  local sk, rk = P .. 'b:' .. k .. ':spent', P .. 'b:' .. k .. ':res'
  local f = redis.call('HGETALL', rk)
  local reserved = 0
  for i = 1, #f, 2 do
    if live(f[i]) then
      reserved = reserved + tonumber(f[i + 1])
    else
      if tonumber(f[i + 1]) > 0 then redis.call('INCRBY', sk, f[i + 1]) end
      redis.call('HDEL', rk, f[i])
    end
  end
  return tonumber(redis.call('GET', sk) or '0'), reserved, sk, rk
end

local function expire(b, sk, rk)
  if b.exp and b.exp > 0 then
    redis.call('PEXPIREAT', sk, b.exp)
    redis.call('PEXPIREAT', rk, b.exp)
  end
end

local function client(n)
  local base = P .. 'c:' .. n
  local keys = {rpm = base .. ':rpm', tpm = base .. ':tpm', tsum = base .. ':tsum', par = base .. ':par'}
  local cut = now - WINDOW
  redis.call('ZREMRANGEBYSCORE', keys.rpm, '-inf', cut)
  local requests = redis.call('ZCARD', keys.rpm)
  local old = redis.call('ZRANGEBYSCORE', keys.tpm, '-inf', cut)
  if #old > 0 then
    local gone = 0
    for _, m in ipairs(old) do gone = gone + (tonumber(string.match(m, ':(%d+)$')) or 0) end
    redis.call('DECRBY', keys.tsum, int(gone))
    redis.call('ZREMRANGEBYSCORE', keys.tpm, '-inf', cut)
  end
  local tokens = tonumber(redis.call('GET', keys.tsum) or '0')
  if tokens < 0 or redis.call('ZCARD', keys.tpm) == 0 then
    tokens = 0
    redis.call('DEL', keys.tsum)
  end
  local f = redis.call('HGETALL', keys.par)
  local par = 0
  for i = 1, #f, 2 do
    if live(f[i]) then par = par + tonumber(f[i + 1]) else redis.call('HDEL', keys.par, f[i]) end
  end
  return {requests = requests, tokens = tokens, par = par}, keys
end

local function refusal(c, state, keys)
  if c.par and state.par >= c.par then return 'max_parallel', 1000 end
  if c.rpm and state.requests >= c.rpm then
    local at = redis.call('ZRANGE', keys.rpm, state.requests - c.rpm, state.requests - c.rpm, 'WITHSCORES')
    return 'rpm', tonumber(at[2]) + WINDOW - now
  end
  if c.tpm and state.tokens >= c.tpm then
    local entries = redis.call('ZRANGE', keys.tpm, 0, -1, 'WITHSCORES')
    local left = state.tokens
    for i = 1, #entries, 2 do
      left = left - (tonumber(string.match(entries[i], ':(%d+)$')) or 0)
      if left < c.tpm then return 'tpm', tonumber(entries[i + 1]) + WINDOW - now end
    end
    return 'tpm', WINDOW
  end
  return nil, 0
end

local function answer(t) return t end

local function money(spent, reserved) return {spent = int(spent), reserved = int(reserved)} end

local function run(op, a)
  if op ~= 'read' or a.renew == 1 then
    local held = lease(epoch)
    if (held == nil or held <= now) and a.fresh ~= 1 then return answer({lost = true}) end
    redis.call('ZADD', EPOCHS, int(now + a.ttl), epoch)
    if a.fresh == 1 then redis.call('ZREMRANGEBYSCORE', EPOCHS, '-inf', int(now - 86400000)) end
  end

  if op == 'read' then
    local out = {clients = {}, keys = {}}
    for i, n in ipairs(a.clients or {}) do
      local state = client(n)
      out.clients[i] = {requests = state.requests, tokens = int(state.tokens), par = state.par}
    end
    for i, k in ipairs(a.keys or {}) do
      local spent, reserved = budget(k)
      out.keys[i] = money(spent, reserved)
    end
    out.replicas = redis.call('ZCOUNT', EPOCHS, '(' .. int(now), '+inf')
    return answer(out)
  end

  if op == 'acquire' or op == 'reserve' then
    local out = {}
    local c = a.c
    if c then
      local state, keys = client(c.n)
      out.requests, out.tokens, out.par = state.requests, int(state.tokens), state.par
      local limit, retry = refusal(c, state, keys)
      local cb_ok, spent, reserved, sk, rk = true, 0, 0, nil, nil
      if a.cb then
        spent, reserved, sk, rk = budget(a.cb.k)
        cb_ok = spent + reserved + tonumber(a.cb.amount) <= a.cb.limit
        out.cb = money(spent, reserved)
        if limit == nil and not cb_ok then limit, retry = 'budget', 0 end
      end
      if limit then
        out.refused, out.retry_ms = limit, retry
        return answer(out)
      end
      redis.call('ZADD', keys.rpm, int(now), c.id)
      redis.call('PEXPIRE', keys.rpm, WINDOW + 1000)
      redis.call('HINCRBY', keys.par, epoch, 1)
      redis.call('PEXPIRE', keys.par, 86400000)
      out.requests, out.par = out.requests + 1, out.par + 1
      if a.cb then
        if a.cb.amount ~= '0' then redis.call('HINCRBY', rk, epoch, a.cb.amount) end
        expire(a.cb, sk, rk)
        out.cb = money(spent, reserved + tonumber(a.cb.amount))
      end
    end
    if a.pb then
      local spent, reserved, sk, rk = budget(a.pb.k)
      out.pb_ok = spent + reserved + tonumber(a.pb.amount) <= a.pb.limit
      if out.pb_ok then
        if a.pb.amount ~= '0' then redis.call('HINCRBY', rk, epoch, a.pb.amount) end
        expire(a.pb, sk, rk)
        reserved = reserved + tonumber(a.pb.amount)
      end
      out.pb = money(spent, reserved)
    end
    return answer(out)
  end

  if op == 'release' then
    local rk = P .. 'b:' .. a.k .. ':res'
    local cur = redis.call('HGET', rk, epoch)
    if cur then
      if tonumber(cur) - tonumber(a.amount) <= 0 then
        redis.call('HDEL', rk, epoch)
      else
        redis.call('HINCRBY', rk, epoch, '-' .. a.amount)
      end
    end
    return answer({})
  end

  if op == 'settle' then
    local out = {b = {}}
    for i, b in ipairs(a.b or {}) do
      local sk, rk = P .. 'b:' .. b.k .. ':spent', P .. 'b:' .. b.k .. ':res'
      local cur = redis.call('HGET', rk, epoch)
      if cur then
        if tonumber(cur) - tonumber(b.r) <= 0 then
          redis.call('HDEL', rk, epoch)
        else
          redis.call('HINCRBY', rk, epoch, '-' .. b.r)
        end
        redis.call('INCRBY', sk, b.c)
        expire(b, sk, rk)
      end
      local spent, reserved = budget(b.k)
      out.b[i] = money(spent, reserved)
    end
    local c = a.c
    if c then
      local base = P .. 'c:' .. c.n
      local par = base .. ':par'
      local left = redis.call('HINCRBY', par, epoch, -1)
      if left <= 0 then redis.call('HDEL', par, epoch) end
      if c.tok and c.tok ~= '0' then
        redis.call('ZADD', base .. ':tpm', int(now), c.id .. ':' .. c.tok)
        redis.call('INCRBY', base .. ':tsum', c.tok)
        redis.call('PEXPIRE', base .. ':tpm', WINDOW + 1000)
        redis.call('PEXPIRE', base .. ':tsum', WINDOW + 1000)
      end
      local state = client(c.n)
      out.requests, out.tokens, out.par = state.requests, int(state.tokens), state.par
    end
    return answer(out)
  end

  if op == 'reconcile' then
    local out = {keys = {}}
    local old = a.old
    local state = 'none'
    if old and old ~= epoch then
      local s = lease(old)
      if s == nil then state = 'unknown' elseif s > now then state = 'live' else state = 'expired' end
    end
    for i, b in ipairs(a.keys or {}) do
      local sk, rk = P .. 'b:' .. b.k .. ':spent', P .. 'b:' .. b.k .. ':res'
      if tonumber(redis.call('GET', sk) or '0') < tonumber(b.known) then redis.call('SET', sk, b.known) end
      local kept = state == 'live' or state == 'unknown'
      if state ~= 'none' then
        local cur = redis.call('HGET', rk, old)
        if cur then
          if state ~= 'live' then
            redis.call('INCRBY', sk, cur)
            kept = false
          end
          redis.call('HDEL', rk, old)
        end
      end
      local reserve = tonumber(b.res_new)
      if kept then
        redis.call('INCRBY', sk, b.settled_old)
        reserve = reserve + tonumber(b.res_old)
      end
      redis.call('INCRBY', sk, b.settled_new)
      if reserve > 0 then redis.call('HINCRBY', rk, epoch, int(reserve)) end
      expire(b, sk, rk)
      out.keys[i] = kept
    end
    for _, c in ipairs(a.clients or {}) do
      local base = P .. 'c:' .. c.n
      if old then redis.call('HDEL', base .. ':par', old) end
      if c.par > 0 then
        redis.call('HSET', base .. ':par', epoch, c.par)
        redis.call('PEXPIRE', base .. ':par', 86400000)
      end
      for _, r in ipairs(c.reqs or {}) do
        if r[1] > now - WINDOW then redis.call('ZADD', base .. ':rpm', int(r[1]), r[2]) end
      end
      redis.call('PEXPIRE', base .. ':rpm', WINDOW + 1000)
      for _, t in ipairs(c.toks or {}) do
        if t[1] > now - WINDOW then
          redis.call('ZADD', base .. ':tpm', int(t[1]), t[2] .. ':' .. t[3])
          redis.call('INCRBY', base .. ':tsum', t[3])
        end
      end
      redis.call('PEXPIRE', base .. ':tpm', WINDOW + 1000)
      redis.call('PEXPIRE', base .. ':tsum', WINDOW + 1000)
    end
    if old and old ~= epoch then redis.call('ZREM', EPOCHS, old) end
    return answer(out)
  end
  if op == 'seed' then
    local out = {keys = {}}
    for i, b in ipairs(a.keys or {}) do
      local base = P .. 'b:' .. b.k
      local sk, rk, mk = base .. ':spent', base .. ':res', base .. ':seeded'
      local first = redis.call('SET', mk, '1', 'NX')
      if first and b.exp and b.exp > 0 then redis.call('PEXPIREAT', mk, b.exp) end
      if first and b.before ~= '' then
        if b.before ~= '0' then redis.call('INCRBY', sk, b.before) end
      elseif tonumber(redis.call('GET', sk) or '0') < tonumber(b.since) then
        redis.call('SET', sk, b.since)
      end
      expire(b, sk, rk)
      local spent, reserved = budget(b.k)
      out.keys[i] = money(spent, reserved)
    end
    return answer(out)
  end
  error('unknown operation ' .. tostring(op))
end

if ARGV[1] == 'batch' then
  local results = {}
  for i, item in ipairs(cjson.decode(ARGV[4])) do
    now, epoch = tonumber(item[3]), item[2]
    local ok, result = pcall(run, item[1], item[4])
    if ok then results[i] = result else results[i] = {error = tostring(result)} end
  end
  return cjson.encode(results)
end
now, epoch = tonumber(ARGV[2]), ARGV[3]
return cjson.encode(run(ARGV[1], cjson.decode(ARGV[4])))
"""

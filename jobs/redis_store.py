"""The Redis job store (``--job-store redis://host:port/db``): one job service for every server that shares it.

Keys (all under ``sd3:jobs:``): ``job:ID`` a hash (the record, ``records.FIELDS`` as strings), ``events:ID`` a
stream of the job's events (bounded, ``MAXLEN ~ 256``; gone a minute after ``done``), and sorted sets ``index`` (every
job, by creation), ``pending`` (waiting for a server, by creation), ``leases`` (by lease end) and ``finished`` (by
end, for ``--job-ttl``); ``seq`` numbers the jobs; the channel ``cancel`` tells owners of cancels. Every write that
must be atomic is one Lua script: the insert with its eviction (``--max-jobs`` for the whole store), the claim, the
renewal and the fenced writes of the owner (progress and its stream entry, the finish), which change nothing unless
the record is still the caller's, at its attempt, and unfinished. Redis' own durability is its configuration's:
run it with ``appendonly yes`` so that a restart of Redis loses no job.

A Redis that cannot be reached raises ``StoreUnavailable``; one that refuses writes (``maxmemory`` reached with
``noeviction``, ``MISCONF`` after a failed save or AOF write, ``READONLY`` as a replica) raises ``StoreRefused``: both
are answered 503 ``job_store_unavailable`` and retried in the background. A script refused at its first write changes
nothing (Redis checks before a script's first write, and lets a script that has written go on), so a refusal never
leaves a record half written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from jobs.errors import StoreFull, StoreRefused, StoreUnavailable
from jobs.records import REQUEUED, attempts_error, from_flat, to_flat

logger = logging.getLogger(__name__)

__all__ = ["RedisBackend"]

PREFIX = "sd3:jobs:"
STREAM_LEN = 256
# Error codes of a Redis that answers but takes no writes now (redis-py raises most as a plain ResponseError).
_REFUSING = frozenset({"OOM", "MISCONF", "READONLY", "NOREPLICAS"})

# Shared by the scripts: ARGV[1] is the key prefix.
_LUA = (
    f"local stream_len = {STREAM_LEN}\n"
    + """
local p = ARGV[1]
local function final(status) return status == 'succeeded' or status == 'failed' or status == 'cancelled' end
local function drop(id)
  redis.call('DEL', p .. 'job:' .. id, p .. 'events:' .. id)
  for _, set in ipairs({'index', 'pending', 'leases', 'finished'}) do redis.call('ZREM', p .. set, id) end
end
local function prune(ttl, now)
  if ttl > 0 then
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. 'finished', '-inf', now - ttl)) do drop(id) end
  end
end
local function owned(id, owner, attempt)
  local f = redis.call('HMGET', p .. 'job:' .. id, 'owner', 'attempt', 'status')
  return f[1] == owner and f[2] == attempt and f[3] and not final(f[3])
end
local function fields(from) local out = {} for i = from, #ARGV do out[#out + 1] = ARGV[i] end return out end
"""
)

# ARGV: prefix, max_jobs, grace, ttl, now, id, lease_until, fields...
_INSERT = """
local max, grace, ttl, now, id = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
prune(ttl, now)
local held = redis.call('ZCARD', p .. 'index')
while held >= max do
  local victim, waits = nil, {}
  for _, jid in ipairs(redis.call('ZRANGE', p .. 'index', 0, -1)) do
    local f = redis.call('HMGET', p .. 'job:' .. jid, 'status', 'finished_at')
    if not f[1] then victim = jid break end
    if f[2] and f[2] ~= '' then
      local left = 0
      if f[1] ~= 'cancelled' then left = math.max(0, tonumber(f[2]) + grace - now) end
      if left == 0 then victim = jid break end
      waits[#waits + 1] = left
    end
  end
  if not victim then
    table.sort(waits)
    local out = {'full', tostring(held)}
    for _, w in ipairs(waits) do out[#out + 1] = tostring(w) end
    return out
  end
  drop(victim)
  held = held - 1
end
local seq = redis.call('INCR', p .. 'seq')
redis.call('HSET', p .. 'job:' .. id, 'seq', seq, unpack(fields(8)))
redis.call('ZADD', p .. 'index', seq, id)
redis.call('ZADD', p .. 'leases', ARGV[7], id)
return {'ok'}
"""

# ARGV: prefix, id, owner, attempt, event name ('' for none), event data, fields...
_PROGRESS = """
local id = ARGV[2]
if not owned(id, ARGV[3], ARGV[4]) then return 0 end
if #ARGV > 6 then redis.call('HSET', p .. 'job:' .. id, unpack(fields(7))) end
if ARGV[5] ~= '' then
  redis.call('XADD', p .. 'events:' .. id, 'MAXLEN', '~', stream_len, '*', 'event', ARGV[5], 'data', ARGV[6])
end
return 1
"""

# ARGV: prefix, id, owner, attempt, now, done data, fields...
_FINISH = """
local id = ARGV[2]
if not owned(id, ARGV[3], ARGV[4]) then return 0 end
redis.call('HSET', p .. 'job:' .. id, unpack(fields(7)))
redis.call('ZREM', p .. 'leases', id)
redis.call('ZREM', p .. 'pending', id)
redis.call('ZADD', p .. 'finished', ARGV[5], id)
redis.call('XADD', p .. 'events:' .. id, 'MAXLEN', '~', stream_len, '*', 'event', 'done', 'data', ARGV[6])
redis.call('EXPIRE', p .. 'events:' .. id, 60)
return 1
"""

# ARGV: prefix, id, owner, attempt, fields...
_RELEASE = """
local id = ARGV[2]
if not owned(id, ARGV[3], ARGV[4]) then return 0 end
redis.call('HSET', p .. 'job:' .. id, unpack(fields(5)))
redis.call('ZREM', p .. 'leases', id)
redis.call('ZADD', p .. 'pending', redis.call('HGET', p .. 'job:' .. id, 'seq'), id)
return 1
"""

# ARGV: prefix, owner, lease_until, renewed_at, id, attempt, id, attempt...
_RENEW = """
local codes = {}
for i = 5, #ARGV, 2 do
  local id = ARGV[i]
  if owned(id, ARGV[2], ARGV[i + 1]) then
    redis.call('HSET', p .. 'job:' .. id, 'lease_until', ARGV[3], 'renewed_at', ARGV[4])
    redis.call('ZADD', p .. 'leases', ARGV[3], id)
    if redis.call('HGET', p .. 'job:' .. id, 'cancel') == '1' then codes[#codes + 1] = 'cancel'
    else codes[#codes + 1] = 'ok' end
  else codes[#codes + 1] = 'lost' end
end
return codes
"""

# ARGV: prefix, now, max_attempts, failed fields (JSON object), requeued fields (JSON object)
# The record is written before the lease is dropped (ZREM): a Redis refusing writes (maxmemory) refuses a script at
# its first write that adds data, and lets one that has written go on; so it refuses the reap as it refused the
# owners' renewals, instead of handing over every job whose lease it would not let be renewed.
_REAP = """
local now, max = tonumber(ARGV[2]), tonumber(ARGV[3])
local failed, requeued = cjson.decode(ARGV[4]), cjson.decode(ARGV[5])
local out, expired = {}, redis.call('ZRANGEBYSCORE', p .. 'leases', '-inf', now)
for _, id in ipairs(expired) do
  local key = p .. 'job:' .. id
  local f = redis.call('HMGET', key, 'status', 'attempt', 'owner', 'seq')
  if f[1] and not final(f[1]) and f[3] ~= '' then
    if tonumber(f[2]) >= max then
      for k, v in pairs(failed) do redis.call('HSET', key, k, v) end
      redis.call('ZADD', p .. 'finished', now, id)
    else
      for k, v in pairs(requeued) do redis.call('HSET', key, k, v) end
      redis.call('ZADD', p .. 'pending', f[4], id)
    end
    out[#out + 1] = id
  end
end
for _, id in ipairs(expired) do redis.call('ZREM', p .. 'leases', id) end
return out
"""

# ARGV: prefix, owner, lease_until, renewed_at
_CLAIM = """
while true do
  local ids = redis.call('ZRANGE', p .. 'pending', 0, 0)
  if #ids == 0 then return false end
  local id, key = ids[1], p .. 'job:' .. ids[1]
  redis.call('ZREM', p .. 'pending', id)
  local status = redis.call('HGET', key, 'status')
  if status and not final(status) then
    redis.call('HINCRBY', key, 'attempt', 1)
    redis.call('HSET', key, 'owner', ARGV[2], 'lease_until', ARGV[3], 'renewed_at', ARGV[4])
    redis.call('ZADD', p .. 'leases', ARGV[3], id)
    return redis.call('HGETALL', key)
  end
end
"""

# ARGV: prefix, id
_CANCEL = """
local key = p .. 'job:' .. ARGV[2]
local status = redis.call('HGET', key, 'status')
if not status then return false end
if not final(status) then
  redis.call('HSET', key, 'cancel', '1')
  redis.call('PUBLISH', p .. 'cancel', ARGV[2])
end
return redis.call('HGETALL', key)
"""


def _pairs(flat: dict[str, str]) -> list[str]:
    return [item for pair in flat.items() for item in pair]


def _refusal(exc: Exception) -> StoreRefused | None:
    """``exc`` as ``StoreRefused`` when it is Redis refusing writes (its first line, without a script's name)."""
    from redis.exceptions import OutOfMemoryError, ReadOnlyError

    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    code = getattr(exc, "status_code", None) or text.partition(" ")[0]
    if isinstance(exc, (OutOfMemoryError, ReadOnlyError)) or code in _REFUSING:
        return StoreRefused(f"redis: {text.partition(' script: ')[0]}")
    return None


def _hash(reply: Any) -> dict[str, Any] | None:
    """A record from HGETALL's reply (a list from a script, a dict from the client)."""
    if not reply:
        return None
    if isinstance(reply, list):
        reply = dict(zip(reply[::2], reply[1::2], strict=True))
    return from_flat(reply)


class RedisBackend:
    def __init__(self, url: str) -> None:
        import redis.asyncio as redis

        # Short timeouts, no retries: a Redis that is away is answered 503 at once, and retried by the tick.
        self.client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10, retry_on_timeout=False)
        self._scripts = {
            name: self.client.register_script(_LUA + body)
            for name, body in (
                ("insert", _INSERT),
                ("progress", _PROGRESS),
                ("finish", _FINISH),
                ("release", _RELEASE),
                ("renew", _RENEW),
                ("reap", _REAP),
                ("claim", _CLAIM),
                ("cancel", _CANCEL),
            )
        }

    async def _do(self, call: Callable[[], Any]) -> Any:
        from redis import exceptions as errors

        for attempt in (1, 2):
            try:
                return await call()
            except (errors.ConnectionError, errors.TimeoutError, errors.BusyLoadingError, OSError) as exc:
                # Once more: after a Redis restart, a pooled connection fails once (closed by the old server).
                if attempt == 2 or isinstance(exc, errors.BusyLoadingError):
                    raise StoreUnavailable(f"redis: {exc}") from None
            except (errors.MasterDownError, errors.TryAgainError) as exc:
                raise StoreUnavailable(f"redis: {exc}") from None
            except errors.ResponseError as exc:
                refused = _refusal(exc)
                if refused is None:
                    raise  # a bug of ours (a script's error, a wrong command): not the store's state
                raise refused from None
        raise AssertionError("unreachable")

    async def _script(self, name: str, *args: Any) -> Any:
        return await self._do(lambda: self._scripts[name](args=[PREFIX, *args]))

    # -- records --------------------------------------------------------------------------------------------------

    async def insert(self, record: dict[str, Any], max_jobs: int, grace: float, ttl: float, now: float) -> None:
        flat = to_flat(record)
        reply = await self._script(
            "insert", max_jobs, grace, ttl, now, record["id"], record["lease_until"], *_pairs(flat)
        )
        if reply[0] == b"full":
            raise StoreFull(int(reply[1]), [float(w) for w in reply[2:]])

    async def load(self, job_id: str) -> dict[str, Any] | None:
        return _hash(await self._do(lambda: self.client.hgetall(PREFIX + "job:" + job_id)))

    async def snapshot(self, job_id: str) -> tuple[dict[str, Any] | None, bytes]:
        """The record and the stream's last id, read in one transaction: the events after it are the news."""

        async def read() -> list[Any]:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hgetall(PREFIX + "job:" + job_id)
                pipe.xrevrange(PREFIX + "events:" + job_id, count=1)
                return await pipe.execute()

        record, last = await self._do(read)
        return _hash(record), (last[0][0] if last else b"0-0")

    async def read(self, job_id: str, cursor: bytes, block_s: float) -> tuple[list[tuple[str, Any]], bytes]:
        key = PREFIX + "events:" + job_id
        reply = await self._do(lambda: self.client.xread({key: cursor}, count=100, block=int(block_s * 1000)))
        events = []
        for _, entries in reply or []:
            for entry_id, fields in entries:
                cursor = entry_id
                events.append((fields[b"event"].decode(), json.loads(fields[b"data"])))
        return events, cursor

    async def delete(self, job_id: str) -> None:
        async def delete() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(PREFIX + "job:" + job_id, PREFIX + "events:" + job_id)
                for name in ("index", "pending", "leases", "finished"):
                    pipe.zrem(PREFIX + name, job_id)
                await pipe.execute()

        await self._do(delete)

    async def progress(
        self, job_id: str, owner: str, attempt: int, fields: dict[str, Any], event: tuple[str, Any]
    ) -> None:
        data = json.dumps(event[1], separators=(",", ":"))
        await self._script("progress", job_id, owner, attempt, event[0], data, *_pairs(to_flat(fields)))

    async def announce(self, job_id: str, name: str, data: dict[str, Any]) -> None:
        """An event no owner writes (a job ended by the reaper)."""
        fields = {"event": name, "data": json.dumps(data, separators=(",", ":"))}
        await self._do(lambda: self.client.xadd(PREFIX + "events:" + job_id, fields, maxlen=STREAM_LEN))

    async def finish(self, job_id: str, owner: str, attempt: int, fields: dict[str, Any], done: dict[str, Any]) -> bool:
        data = json.dumps(done, separators=(",", ":"))
        now = fields["finished_at"]
        return bool(await self._script("finish", job_id, owner, attempt, now, data, *_pairs(to_flat(fields))))

    async def release(self, job_id: str, owner: str, attempt: int, fields: dict[str, Any]) -> None:
        await self._script("release", job_id, owner, attempt, *_pairs(to_flat(fields)))

    async def request_cancel(self, job_id: str) -> dict[str, Any] | None:
        return _hash(await self._script("cancel", job_id))

    # -- leases ---------------------------------------------------------------------------------------------------

    async def renew(
        self, owner: str, held: dict[str, int], lease_until: float, renewed_at: float | None = None
    ) -> dict[str, str]:
        args = [item for job_id, attempt in held.items() for item in (job_id, attempt)]
        now = time.time() if renewed_at is None else renewed_at
        codes = await self._script("renew", owner, lease_until, now, *args)
        return {job_id: code.decode() for job_id, code in zip(held, codes, strict=True)}

    async def reap(self, now: float, max_attempts: int) -> list[dict[str, Any]]:
        ended = {"status": "failed", "owner": "", "finished_at": now, "position": None, "preview": None}
        failed = to_flat({**ended, "error": attempts_error(max_attempts)})
        ids = await self._script("reap", now, max_attempts, json.dumps(failed), json.dumps(to_flat(REQUEUED)))
        records = [await self.load(raw.decode()) for raw in ids]
        return [record for record in records if record is not None]

    async def claim_next(
        self, owner: str, lease_until: float, renewed_at: float | None = None
    ) -> dict[str, Any] | None:
        return _hash(await self._script("claim", owner, lease_until, time.time() if renewed_at is None else renewed_at))

    async def prune(self, now: float, ttl: float) -> None:
        if ttl <= 0:
            return
        stale = await self._do(lambda: self.client.zrangebyscore(PREFIX + "finished", "-inf", now - ttl))
        for raw in stale:
            await self.delete(raw.decode())

    # -- cancels from other servers -------------------------------------------------------------------------------

    async def watch_cancels(self, on_cancel: Callable[[str], None]) -> None:
        """Call ``on_cancel(job_id)`` for every cancel any server publishes; reconnects after an outage (cancels
        missed meanwhile are seen at the owner's next renewal)."""
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(PREFIX + "cancel")
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        on_cancel(message["data"].decode())
            except Exception as exc:  # noqa: BLE001 - any connection trouble: wait, subscribe again
                logger.debug("cancel channel: %s", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.aclose()

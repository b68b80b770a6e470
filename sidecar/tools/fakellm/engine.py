"""The simulated engine behind fake-llm: running sequences bounded by `max_num_seqs`, a FIFO
waiting queue, a KV cache of `kv_cache_tokens` shared by the cached prompt prefixes (least
recently used leave first), and the counters its metrics page reports.

The page itself is rendered by dialects.py, under the names of the server fake-llm stands
in for (`--engine`, vLLM by default). vLLM's names, types and meanings follow its V1
engine's `vllm/v1/metrics/loggers.py`: gauges `vllm:num_requests_running`,
`vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` (a fraction 0-1 despite its name)
and the V0 engine's name of the same gauge, `vllm:gpu_cache_usage_perc`; counters (exposed
with `_total`) `vllm:prefix_cache_queries` / `vllm:prefix_cache_hits` in prompt tokens,
`vllm:prompt_tokens`, `vllm:generation_tokens` and `vllm:request_success`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator

from sidecar.tools.fakellm.dialects import Snapshot, vllm


def count_tokens(text: str) -> int:
    # ~4 characters per token, the usual rule of thumb for English text.
    return max(1, (len(text) + 3) // 4)


def prefix_keys(segments: list[str]) -> list[bytes]:
    """One key per message prefix: the digest of messages 0..i."""
    digest = hashlib.blake2b(digest_size=16)
    keys = []
    for segment in segments:
        digest.update(segment.encode() + b"\x00")
        keys.append(digest.copy().digest())
    return keys


class Clairvoyant:
    """The cache no placement can beat: every pod holding every prompt prefix any earlier
    call sent to any pod, none ever evicted. A call's tokens it lacks are at most those the
    call's own pod lacks (`Engine.lookup`), wherever the call went; so they bound a call's
    prefill from below and the prefix-cache hit rate from above, for any router."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()
        self.tokens = 0       # prompt tokens looked up
        self.new_tokens = 0   # of which no earlier call had sent

    def lookup(self, segments: list[str]) -> int:
        """Tokens of this prompt in no earlier call's prompt prefix; then remembers it."""
        new = 0
        for key, segment in zip(prefix_keys(segments), segments, strict=True):
            size = count_tokens(segment)
            self.tokens += size
            if key not in self._seen:
                self._seen.add(key)
                new += size
        self.new_tokens += new
        return new

    @property
    def hit_rate(self) -> float:
        return 1 - self.new_tokens / self.tokens if self.tokens else 0.0


class Engine:
    """Admission, the prefix cache and the counters. Limits are read from the caller on
    every call, so `/_control` changes apply to the next request."""

    def __init__(self) -> None:
        self.running = 0
        self.in_use_tokens = 0      # KV held by running sequences (prompt + completion)
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        # prefix key (digest of messages 0..i) → tokens of message i alone, so the sum of
        # values is the cache's size in tokens.
        self._prefixes: OrderedDict[bytes, int] = OrderedDict()
        self.cached_tokens = 0
        self.prefix_queries = 0     # prompt tokens looked up
        self.prefix_hit_tokens = 0  # of which found cached
        self.prefix_hits = 0        # requests that found any cached prefix
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.successes = 0
        self.admitted = 0           # sequences ever admitted (kept across reset)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def reset(self) -> None:
        """Forget the cache and the counters; sequences running or waiting carry on."""
        self._prefixes.clear()
        self.cached_tokens = 0
        self.prefix_queries = self.prefix_hit_tokens = self.prefix_hits = 0
        self.prompt_tokens = self.generation_tokens = self.successes = 0

    def usage(self, capacity: int) -> float:
        """vLLM's kv_cache_usage_perc: the fraction of KV blocks held by running requests
        (cached blocks nobody uses are free-and-evictable there, so they do not count)."""
        return min(1.0, self.in_use_tokens / capacity) if capacity > 0 else 0.0

    # -- admission -----------------------------------------------------------------------

    def _admissible(self, need: int, max_seqs: int, capacity: int) -> bool:
        if max_seqs > 0 and self.running >= max_seqs:
            return False
        # A sequence that alone exceeds the cache still runs when nothing else does.
        return capacity <= 0 or self.running == 0 or self.in_use_tokens + need <= capacity

    @contextlib.asynccontextmanager
    async def sequence(self, need: int, max_seqs: int, capacity: int) -> AsyncIterator[None]:
        """Hold a running slot and `need` KV tokens; waits first-come first-served."""
        if self._waiters or not self._admissible(need, max_seqs, capacity):
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (need, future)
            self._waiters.append(entry)
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self._release(need, max_seqs, capacity)  # admitted, then cancelled
                else:
                    self._waiters.remove(entry)
                raise
        else:
            self._take(need)
        try:
            yield
        finally:
            self._release(need, max_seqs, capacity)

    def _take(self, need: int) -> None:
        self.admitted += 1
        self.running += 1
        self.in_use_tokens += need

    def _release(self, need: int, max_seqs: int, capacity: int) -> None:
        self.running -= 1
        self.in_use_tokens -= need
        while self._waiters and self._admissible(self._waiters[0][0], max_seqs, capacity):
            waiting_need, future = self._waiters.popleft()
            self._take(waiting_need)
            future.set_result(None)

    # -- the prefix cache ----------------------------------------------------------------

    def uncached(self, segments: list[str]) -> int:
        """Prompt tokens not covered by the longest cached message prefix; the cache as it
        was (a router that mirrors this engine weighs pods with it)."""
        sizes = [count_tokens(s) for s in segments]
        return sum(sizes) - self._cached(prefix_keys(segments), sizes)

    def _cached(self, keys: list[bytes], sizes: list[int]) -> int:
        """Prompt tokens in the longest cached message prefix."""
        for i in range(len(keys) - 1, -1, -1):
            if keys[i] in self._prefixes:
                return sum(sizes[:i + 1])
        return 0

    def lookup(self, segments: list[str], max_entries: int, capacity: int) -> int:
        """Prompt tokens not covered by the longest cached message prefix; then caches this
        prompt's prefixes, evicting the least recently used past the bounds."""
        sizes = [count_tokens(s) for s in segments]
        keys = prefix_keys(segments)
        total = sum(sizes)
        cached = self._cached(keys, sizes)
        self.prefix_queries += total
        self.prefix_hit_tokens += cached
        if cached:
            self.prefix_hits += 1
        # Longest prefix first, so a conversation's shorter prefixes are the most recent:
        # eviction then trims a conversation from its end, never leaving a hole.
        for key, size in zip(reversed(keys), reversed(sizes), strict=True):
            if key not in self._prefixes:
                self._prefixes[key] = size
                self.cached_tokens += size
            self._prefixes.move_to_end(key)
        entries = max(1, max_entries)
        while self._prefixes and (len(self._prefixes) > entries
                                  or (capacity > 0 and self.cached_tokens > capacity)):
            _, size = self._prefixes.popitem(last=False)
            self.cached_tokens -= size
        return total - cached

    # -- /metrics ------------------------------------------------------------------------

    def metrics(self, model: str, capacity: int, max_num_seqs: int = 0) -> str:
        """vLLM's page (the default dialect; dialects.py has the others)."""
        return vllm(Snapshot.of(self, model, capacity, max_num_seqs))

"""Sticky until saturated: where a new session starts and when a session leaves its pod.
Pure: pod loads (or None when unknown) and numbers in, an index or None out.

Thresholds, and why:
- A pod is *saturated* when it queues at least one request (`SATURATED_WAITING`) or its KV
  cache is ≥ 90 % in use (`SATURATED_KV`). vLLM queues only when all `max_num_seqs` slots
  are busy or the KV cache has no room, so any queue means the next call waits for a whole
  running request to finish; at ≥ 90 % KV the next long prompt is what triggers preemption.
- The wait a call meets is Little's law on the queue: it waits for the completions ahead of
  it at the rate the pod completes requests (measured between scrapes); before a rate is
  known, `FALLBACK_REQUEST_S` per slot is assumed. Ahead of it: the calls on the pod past
  its slots (the view's running + waiting plus this sidecar's calls since the view,
  against the slots it ran the last time it queued), or before the pod was ever seen
  queueing, the view's queue plus this sidecar's calls since.
- Moving, or spilling to a pod that does not hold the prompt's prefix, costs re-prefilling
  it there: `prompt_tokens / PREFILL_TOKENS_PER_S`. 10 000 tokens/s is the low end of one
  vLLM replica's prefill rate for an 8B model on a modern GPU; choosing it low makes moves
  and cold spills rarer, never eager.
- A move's target must be unsaturated, not full now (this sidecar's calls since its view
  counted) and have room for the call (`running + waiting + 1 ≤` the source's running
  count), so equal pods never trade sessions and a move can never be answered by a move
  back: the source is saturated, the target is not, and a move back would need the
  reverse.
- How many sessions leave a saturated pod per reading: as many as it queues when the
  reading is this sidecar's own (its scrapes are spread in time from the other sidecars',
  so the next one sees the effect of the last one's moves). A reading every sidecar gets at
  once (the fleet monitor's view) would make each of them move that many at the same
  instant, onto the same least-loaded pod: there each takes its share of the queue — its
  own calls on the pod over all of the pod's — rounded up or down at random, so the
  fleet moves about as many as the pod queues.
- A new session goes to the first of its `NEW_SESSION_CHOICES` rendezvous choices that is
  not full now and within the bounded-load factor of the pool's mean load; if none is, to
  the one of them where a call waits least. Load is requests on the pod (running + waiting,
  plus this sidecar's calls and new sessions there since the view: sessions that start in
  one burst are placed before the view shows any of them; a new session counts as many
  calls as wait on its first touch, since an agent's parallel calls arrive together)
  weighted by how long the pod takes per request (Little's law: running / completion
  rate) relative to the pool's median, so a pod at half speed counts its sessions twice.
  Three choices keep a session's pod predictable while giving a hot pod two ways out —
  the power of two choices, plus one.
- A subagent's session starts on its parent's pod or the parent session's next rendezvous
  choice (`SEED_CHOICES`), or a pod where a sibling took the prompt before, whichever
  costs less: the longest wait a call may meet there now (a whole request's time per
  pod-full of calls ahead: a seeded session stays, and fan-outs start together), plus the
  prompt's prefill where it is not cached (the parent's pod holds the parent's prompt;
  another holds it once a sibling started or spilled there). A full parent's pod whose
  queue is shorter than the prefill keeps the child; siblings that overflow share one
  cold prefill, and their spills find it cached; when every one of them is full and
  waiting costs more than a cold prefill, a pick of its own (where its siblings then
  follow). The average wait (Little's law) would keep a child behind a fan-out that
  started together, which frees no slot for a whole request.
- A session's parallel call *spills* (that call only; the session's route stays) when the
  session already has a call in flight and one more call would queue on its pod now. It
  goes to a pod that is ready, was not queueing at its last view, has a free slot now and
  is clearly less loaded than home (`occupancy + 1 ≤` home's): the first of the session's
  next rendezvous choices that this sidecar sent the prompt's prefix to before (a
  sibling's spill, the session's own earlier one), else — only when re-prefilling the
  prompt there is shorter than the wait at home — the least loaded of its next
  `SPILL_CHOICES` choices. A spill to a cold pod that does not pay would trade a wait for
  a longer prefill and push the prompt out of another pod's cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from sidecar.fleet.podload import PodLoad

SATURATED_WAITING = 1.0
SATURATED_KV = 0.9
PREFILL_TOKENS_PER_S = 10_000.0
FALLBACK_REQUEST_S = 1.0
NEW_SESSION_CHOICES = 3
SPILL_CHOICES = 2
SEED_CHOICES = 2
BYTES_PER_TOKEN = 4  # a request body's bytes → prompt tokens (JSON overhead included)
# A call's prefix, for knowing where it is cached: the first this many bytes of its body
# (model and options, then the messages in order; a conversation only appends).
PREFIX_BYTES = 4096


def saturated(load: PodLoad | None) -> bool:
    return load is not None and (load.waiting >= SATURATED_WAITING
                                 or load.kv_usage >= SATURATED_KV)


def reprefill_s(prompt_tokens: int) -> float:
    return prompt_tokens / PREFILL_TOKENS_PER_S


def occupancy(load: PodLoad | None, local_inflight: int, added: int = 0) -> float:
    """Requests on the pod: the fleet view when known plus the calls this sidecar `added`
    there since it was read (fewer when some of its calls ended), never less than this
    sidecar's own."""
    if load is None:
        return float(local_inflight)
    return max(load.running + load.waiting + added, float(local_inflight))


def service_s(load: PodLoad | None) -> float | None:
    """Mean time a request runs on the pod (Little's law on the running set), if known."""
    if load is None or load.rate <= 0 or load.running <= 0:
        return None
    return load.running / load.rate


def slowness(loads: Sequence[PodLoad | None]) -> list[float]:
    """Each pod's time per request over the pool's median (1.0 when unknown)."""
    known = sorted(s for s in map(service_s, loads) if s is not None)
    if len(known) < 2:
        return [1.0] * len(loads)
    median = known[len(known) // 2]
    return [1.0 if (s := service_s(load)) is None else s / median for load in loads]


class SpillPod(NamedTuple):
    """One pod as the spill decision sees it: the fleet's last view of it, refreshed by
    what this sidecar did since (its own calls are the news a view has not caught yet)."""

    load: PodLoad | None
    local: int = 0          # this sidecar's calls in flight there now
    since_view: int = 0     # of which it started after the view was taken (net; may be < 0)
    slots: float = 0.0      # sequences the pod runs at once, as seen while it queued; 0: unknown
    ready: bool = True


def occupancy_now(pod: SpillPod) -> float:
    """Requests on the pod now: the view plus this sidecar's calls since, never less than
    this sidecar's own."""
    return occupancy(pod.load, pod.local, pod.since_view)


def full_now(pod: SpillPod) -> bool:
    """Would one more call queue there? Its KV cache is nearly full, or its requests now
    fill the slots it was seen to have; a pod never seen queueing: its view's queue."""
    if pod.load is None:
        return False
    if pod.slots > 0:
        return pod.load.kv_usage >= SATURATED_KV or occupancy_now(pod) >= pod.slots
    return saturated(pod.load)


def calls_ahead(pod: SpillPod) -> float:
    """Calls one more call sent to a full pod now waits behind: counted from the slots the
    pod was seen to run and the calls on it now (this sidecar's since the view included),
    else from the view's queue."""
    load = pod.load
    assert load is not None
    if pod.slots > 0:
        return max(occupancy_now(pod) - pod.slots + 1, 1.0)
    # queueing in the view: this sidecar's calls since then joined its queue
    return load.waiting + max(pod.since_view, 0) + 1


def wait_now_s(pod: SpillPod) -> float:
    """How long one more call sent there now waits for a slot (0 when it has one), on
    average: Little's law on the calls ahead of it."""
    if not full_now(pod):
        return 0.0
    load = pod.load
    assert load is not None
    if load.rate > 0:
        return calls_ahead(pod) / load.rate
    return calls_ahead(pod) * FALLBACK_REQUEST_S / max(load.running, pod.slots, 1.0)


def longest_wait_s(pod: SpillPod) -> float:
    """How long one more call sent there now may wait for a slot (0 when it has one): a
    whole request's time for each pod-full of calls ahead, as when the calls running there
    started together (a fan-out's do, and a burst of them is what fills a pod)."""
    if not full_now(pod):
        return 0.0
    load = pod.load
    assert load is not None
    slots = max(pod.slots, load.running, 1.0)
    # A pod that is full runs `slots` requests; at its completion rate each takes this long.
    request_s = slots / load.rate if load.rate > 0 else FALLBACK_REQUEST_S
    return math.ceil(calls_ahead(pod) / slots) * request_s


def choose_move(current: PodLoad | SpillPod | None,
                others: Sequence[PodLoad | SpillPod | None], prompt_tokens: int) -> int | None:
    """Index into `others` (the pool's other ready pods, rendezvous order) to move the
    session to, or None to stay. A pod given as a `SpillPod` counts this sidecar's calls
    since its reading: the wait at the current pod grows with them, and a target they
    fill since its reading has no room (a burst of moves lands before readings show it)."""
    here = _pod(current)
    if not saturated(here.load):
        return None
    load = here.load
    assert load is not None
    gain = wait_now_s(here)  # an unsaturated target's own wait is 0
    if gain <= reprefill_s(prompt_tokens):
        return None
    best: int | None = None
    best_load = math.inf
    for i, pod in enumerate(map(_pod, others)):
        if pod.load is None or not pod.ready or saturated(pod.load) or full_now(pod):
            continue
        taken = occupancy_now(pod)
        if taken + 1 > load.running:
            continue  # not clearly less loaded: no free slot for this call
        if taken + pod.load.kv_usage < best_load:
            best, best_load = i, taken + pod.load.kv_usage
    return best


def _pod(pod: PodLoad | SpillPod | None) -> SpillPod:
    return pod if isinstance(pod, SpillPod) else SpillPod(pod)


def choose_spill(home: SpillPod, session_inflight: int, choices: Sequence[SpillPod],
                 prompt_tokens: int = 0, warm: Sequence[bool] = ()) -> int | None:
    """Index into `choices` (the session's next rendezvous choices after its home pod) for
    one parallel call of a session, or None to send it home. `session_inflight`: the
    session's other calls in flight; `prompt_tokens`: the call's prompt; `warm[i]`: a call
    with this prompt's prefix was sent to `choices[i]` recently (its prefill there is
    short)."""
    if session_inflight < 1 or not full_now(home):
        return None  # a lone call, or a pod with room: the session's pod serves it
    room = occupancy_now(home)
    pays = reprefill_s(prompt_tokens) < wait_now_s(home)
    best: int | None = None
    best_load = math.inf
    for i, pod in enumerate(choices):
        load = pod.load
        # A pod whose last view queued is not trusted to have drained; an unknown load
        # may be a queue: only a pod seen with room, and with room now, takes a spill.
        if not pod.ready or load is None or saturated(load) or full_now(pod):
            continue
        taken = occupancy_now(pod)
        if taken + 1 > room:
            continue  # not clearly less loaded than home: equal pods never trade calls
        if i < len(warm) and warm[i]:
            return i  # the prefix is there: the call starts as soon as at home, or sooner
        if pays and i < SPILL_CHOICES and taken + load.kv_usage < best_load:
            best, best_load = i, taken + load.kv_usage
    return best


def worth_waiting(pod: SpillPod, prompt_tokens: int) -> bool:
    """Does a new session whose prompt is cached on this pod start sooner here than on a
    cold pod with room? Ready, and either not full now or its longest wait shorter than the
    prompt's prefill. (The first-touch script seeds a child onto its parent's pod only if
    so.)"""
    return pod.ready and (not full_now(pod)
                          or longest_wait_s(pod) <= reprefill_s(prompt_tokens))


def choose_seed(pods: Sequence[SpillPod], prompt_tokens: int = 0,
                warm: Sequence[bool] = ()) -> int | None:
    """Where a subagent's session starts: index into `pods` (its parent's pod, the parent
    session's next rendezvous choice, then any other pods), or None for a pick of its own.
    Each ready pod costs the longest wait a call may meet there now (`longest_wait_s`: the
    session stays, and its fan-outs meet that queue again), plus the prompt's prefill where
    the prompt is not cached: the parent's pod holds the parent's prompt, which the
    child's starts with; another holds it when this sidecar sent that prefix there
    (`warm[i]`: a sibling started or a call spilled there). Only the first
    `SEED_CHOICES` are taken cold. The cheapest wins, the earlier on a tie; a full pod
    whose wait costs more than a cold prefill where a call has room loses to the child's
    own pick."""
    cold = reprefill_s(prompt_tokens)
    best: int | None = None
    best_cost = math.inf
    for i, pod in enumerate(pods):
        cached = i == 0 or (i < len(warm) and warm[i])
        if not pod.ready or (i >= SEED_CHOICES and not cached):
            continue
        cost = longest_wait_s(pod) + (0.0 if cached else cold)
        if cost < best_cost:
            best, best_cost = i, cost
    if best is not None and full_now(pods[best]) and best_cost > cold:
        return None  # each wait is longer than a cold prefill where a call has room
    return best


def choose_new(loads: Sequence[PodLoad | None], local_inflight: Sequence[int],
               load_factor: float, added: Sequence[int] | None = None,
               slots: Sequence[float] | None = None) -> int:
    """Index of a new session's pod among the ready pods in its rendezvous order (`added`:
    per pod, this sidecar's calls there since its load was read; `slots`: the sequences
    each was seen to run while it queued, 0 when unknown). A pod whose slots this sidecar's
    calls since the reading fill counts as saturated: a burst of new sessions arrives
    faster than readings do."""
    n = len(loads)
    if n <= 1:
        return 0
    weights = slowness(loads)
    added = added or [0] * n
    scores = [occupancy(load, local, extra) * weight for load, local, extra, weight
              in zip(loads, local_inflight, added, weights, strict=True)]
    now = [SpillPod(load, local, extra, slot) for load, local, extra, slot
           in zip(loads, local_inflight, added, slots or [0.0] * n, strict=True)]
    first = min(n, NEW_SESSION_CHOICES)
    bound = math.ceil(load_factor * (sum(scores) + 1) / n) if load_factor > 0 else math.inf
    for i in range(first):
        if not full_now(now[i]) and scores[i] + weights[i] <= bound:
            return i
    return min(range(first), key=lambda i: (wait_now_s(now[i]), scores[i], i))


def move_budget(load: PodLoad | None, local_inflight: int, shared: bool, draw: float) -> int:
    """Sessions this sidecar may move off the pod until its next reading of `load`;
    `shared`: every sidecar got the same reading at once; `draw`: uniform in [0, 1)."""
    if load is None or not saturated(load):
        return 0
    if not shared:
        return math.ceil(load.waiting)
    on_pod = load.running + load.waiting
    share = min(1.0, local_inflight / on_pod) if on_pod > 0 else 0.0
    quota = load.waiting * share
    whole = math.floor(quota)
    return whole + (1 if draw < quota - whole else 0)

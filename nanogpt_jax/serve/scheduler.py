"""Continuous batching: requests come and go in a fixed set of decode slots.

    HTTP handlers (event loop)              scheduler thread (the only one calling JAX)
    submit(job) --> waiting jobs --> admit: prefill prompts shortest first, short ones of
                                            a bucket together (up to 128 slots a call),
                                            while rows run no longer than a decode call;
                                            insert each prompt's rows (its n samples)
                                            into free slots, their first tokens out
                                     decode: K steps for the first 2, 4, 8 ... slots,
                                            as many as hold the running rows; after one
                                            that ended requests, a moment for their
                                            clients' next ones
            <-- events per job <--   text: stop strings, streamed pieces, finished rows;
                                            a finished row frees its slot for the next

Rows start whenever a slot frees, so the decode state holds rows of different ages; each
carries its own length, settings and key stream (see `nanogpt_jax.engine`). Sample j of a
request with seed s draws from the key stream of row j of `bundle.generate(prompt, seed=s)`,
and a row's logits do not depend on the other rows, so its text is the same alone, under
load, or in any slot. Every program is compiled during warm-up, so traffic compiles nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import threading
import time
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from nanogpt_jax.engine import FILL, MIN_ROWS, Prefilled, engine_of
from nanogpt_jax.generate import padded, prompt_bucket
from nanogpt_jax.sampling import SamplingParams, next_power_of_two
from nanogpt_jax.serve.protocol import MAX_LOGPROBS
from nanogpt_jax.sharding import to_host

TOP_K_BUCKET = 256  # top_k up to this shares the usual program; beyond, a bisection
# Prompts of one bucket are prefilled together, 2, 4 or 8 in a call, while their slots add up
# to at most this many: XLA:CPU multiplies a few rows at a fraction of its speed on many (gpt2,
# float32: 16-token prompts 60 ms alone, 26 ms each four together; 64-token 100 ms alone, 88
# each in pairs; 128 tokens gain nothing), and a prompt's numbers are the same either way.
PREFILL_GROUP_SLOTS = 128
# When a decode call ends rows, their clients may send their next requests at once (a closed
# loop, a chat, a pipeline); the next call waits for them up to this share of the last call's
# time: a request that misses the start of a call waits for all of it.
FOLLOW_UP_WAIT = 0.15


@dataclasses.dataclass
class Prompt:
    """One prompt of a request, shared by its n rows."""

    tokens: list[int]  # as the model sees them: cropped to block_size
    text: str  # as echoed back
    given_tokens: int  # before cropping (what usage counts)
    job: Job | None = None
    prefilled: Prefilled | None = None  # on the device while rows still wait for a slot
    prefilled_row: int = 0  # its row there (prompts prefilled together share one)
    waiting_rows: int = 0
    # with echo and logprobs: per prompt token, its log-probability and the likeliest others
    scores: tuple | None = None

    @property
    def scored(self) -> bool:
        return self.job.scored


@dataclasses.dataclass
class Row:
    """One choice of a request: a slot while it runs."""

    job: Job
    index: int  # the choice's index in the response
    sample: int  # j: the prompt's j-th sample, drawn from key stream j
    prompt: Prompt
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    sent_tokens: int = 0  # tokens whose text has gone out
    sent_text: str = ""
    finish_reason: str | None = None
    slot: int | None = None
    last_delivery: float | None = None
    early: bool = False  # its first token went out on insertion; the next decode repeats it


@dataclasses.dataclass
class Job:
    """One request. `notify(event)` is called from the scheduler thread for each event:
    ("piece", Piece), ("error", message) or ("done",)."""

    id: str
    prompts: list[Prompt]
    n: int
    max_tokens: int
    sampling: dict  # temperature, top_k (0: off), top_p, min_p
    stops: list[str]
    seed: int
    logprobs: int | None
    echo: bool
    notify: Callable
    arrived: float = dataclasses.field(default_factory=time.perf_counter)
    first_token: float | None = None
    cancelled: bool = False
    rows: list[Row] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.rows = [
            Row(self, index=i * self.n + j, sample=j, prompt=prompt)
            for i, prompt in enumerate(self.prompts)
            for j in range(self.n)
        ]
        for prompt in self.prompts:
            prompt.job, prompt.waiting_rows = self, self.n

    @property
    def scored(self) -> bool:
        """Its prompts' tokens are to be scored (echo with logprobs)."""
        return self.echo and self.logprobs is not None

    @property
    def finished(self) -> bool:
        return all(row.finish_reason is not None for row in self.rows)


@dataclasses.dataclass(frozen=True)
class Piece:
    """New text of one row, the tokens behind it, and whether the row has finished."""

    index: int  # the choice
    text: str
    token_ids: list[int]
    logprobs: list[float]  # empty unless the request asked for logprobs
    top: list[list[tuple[int, float]]]
    finish_reason: str | None


class QueueFull(Exception):
    pass


class Scheduler:
    """Owns the decode state and the thread that advances it."""

    def __init__(
        self,
        bundle,
        slots: int,
        max_queue: int,
        decode_steps: int,
        metrics,
        log=None,
        prefill_group_slots: int = PREFILL_GROUP_SLOTS,
    ):
        if slots < MIN_ROWS:
            raise ValueError(f"slots must be at least {MIN_ROWS}")
        self.bundle, self.engine = bundle, engine_of(bundle)
        self.tokenizer, self.config = bundle.tokenizer, bundle.config
        self.slots, self.max_queue = slots, max_queue
        self.decode_steps = next_power_of_two(decode_steps)
        self.prefill_group_slots = prefill_group_slots
        self.metrics = metrics
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        eot = self.tokenizer.eot_id
        self.stop_ids = jnp.asarray([FILL if eot is None else eot], jnp.int32)
        self.block_size = self.config.block_size
        self.buckets = sorted(
            {prompt_bucket(n, self.block_size) for n in range(1, self.block_size + 1)}
        )
        self.waiting: collections.deque[Job] = collections.deque()
        self.arrivals = 0  # requests submitted so far
        self.admitted: list[Prompt] = []  # taken from `waiting`, not prefilled yet
        self.pending: collections.deque[Row] = collections.deque()  # admitted, no slot yet
        self.running: dict[int, Row] = {}
        self.condition = threading.Condition()
        self.stopping = False
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.main, name="scheduler", daemon=True)
        self.state = None
        self.last_decode_seconds = 0.0
        self.programs_after_warmup = None
        self.failed: str | None = None  # why the thread stopped, if it did

    # ------------------------------------------------------------------ the handlers' side

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.condition:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull
            self.waiting.append(job)
            self.arrivals += 1
            self.metrics.waiting.set(len(self.waiting))
            self.condition.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone: its rows free their slots at the next chunk of steps."""
        with self.condition:
            job.cancelled = True
            self.condition.notify()

    def stop(self) -> None:
        """Finish what was submitted, then end the thread."""
        with self.condition:
            self.stopping = True
            self.condition.notify()
        self.thread.join()

    # ------------------------------------------------------------------ the thread

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.admitted or self.pending or self.running)

    def main(self) -> None:
        try:
            self.warm_up()
            self.ready.set()
            while True:
                with self.condition:
                    while not (self.busy or self.stopping):
                        self.condition.wait()
                    if self.stopping and not self.busy:
                        return
                self.admit()
                if self.running:
                    self.wait_for_follow_ups(*self.step())
        except BaseException as e:  # the server cannot go on: say so to every client waiting
            self.failed = f"{type(e).__name__}: {e}"
            self.ready.clear()
            self.log(f"scheduler stopped: {self.failed}")
            rows = [*self.pending, *self.running.values()]
            jobs = [*self.waiting, *(p.job for p in self.admitted), *(r.job for r in rows)]
            for job in dict.fromkeys(jobs):
                job.notify(("error", f"the server failed: {type(e).__name__}"))
            raise

    def warm_up(self) -> None:
        """Compile every program traffic can need: prefill (with and without the prompt's
        log-probabilities) and insert per prompt bucket and group size, and each decode
        variant."""
        began = time.perf_counter()
        engine = self.engine
        self.state = engine.empty(self.slots, self.block_size, self.block_size)
        sampling = SamplingParams.create(1.0, vocab_size=self.tokenizer.vocab_size)
        for bucket in self.buckets:
            engine.prefill(*padded([[0]], bucket), prompt_logprobs=MAX_LOGPROBS)
            for size in self.group_sizes(bucket):
                prefilled = scoreless(engine.prefill(*padded([[0]] * size, bucket)))
                self.state, _ = engine.insert(self.state, prefilled, 0, 0, 0, 0, sampling, 1)
        for top_k_bucket in self.top_k_buckets():
            for use_top_p in (False, True):
                self.state = self.with_variant(top_k_bucket, use_top_p)
                for rows in self.row_counts:
                    self.state, _ = engine.decode(
                        self.state, self.stop_ids, self.decode_steps, rows=rows
                    )
                self.state, _ = engine.decode(
                    self.state, self.stop_ids, self.decode_steps, MAX_LOGPROBS
                )
        self.state = engine.release(self.state, np.ones(self.slots, bool))
        self.programs_after_warmup = engine.compile_count
        self.metrics.programs.set(engine.compile_count)
        self.log(
            f"warm: {engine.compile_count} programs compiled in "
            f"{time.perf_counter() - began:.1f} s ({self.slots} slots)"
        )

    @property
    def row_counts(self) -> list[int]:
        """Rows a decode call may run: the first 2, 4, 8 ... slots, and all of them. A call
        runs as few as hold every occupied slot (rows go to the lowest free slot), so a
        lightly loaded server decodes at the speed of its load, not of its size. Requests
        with logprobs run every slot (one program less per variant)."""
        if not self.engine.decodes_first_rows:
            return [self.slots]
        counts, rows = [], MIN_ROWS
        while rows < self.slots:
            counts.append(rows)
            rows *= 2
        return [*counts, self.slots]

    def group_sizes(self, bucket: int) -> list[int]:
        """How many prompts of this bucket a prefill call may take: 1, 2, 4 ... while their
        slots fit `prefill_group_slots`."""
        sizes = [1]
        while sizes[-1] * 2 * bucket <= self.prefill_group_slots:
            sizes.append(sizes[-1] * 2)
        return sizes

    def top_k_buckets(self) -> list[int]:
        vocab = self.tokenizer.vocab_size
        return sorted({0, min(TOP_K_BUCKET, vocab), vocab})

    def with_variant(self, top_k_bucket: int, use_top_p: bool):
        sampling = dataclasses.replace(
            self.state.sampling, top_k_bucket=top_k_bucket, use_top_p=use_top_p, greedy=False
        )
        return dataclasses.replace(self.state, sampling=sampling)

    def admit(self) -> None:
        """Fill free slots: rows of admitted requests first, then waiting requests' prompts,
        shortest bucket first, those of one short bucket together; each prefill call's rows
        go in (their first tokens out) before the next prompts are chosen, from every prompt
        waiting by then: a short request that arrives during a burst of long prompts goes
        ahead of those still waiting.

        While rows run, a pass prefills no longer than the last decode call took (one group
        at least), then the running rows take their turn: their tokens do not stall behind a
        burst of prompts, and rows admitted in one burst start, and so end, in different
        calls. (Rows that all end in one call would bring their clients' next requests back
        as one burst, whose median waits for half of it to be prefilled.)"""
        free = [s for s in range(self.slots) if s not in self.running]
        while free and self.pending:
            self.place(self.pending.popleft(), free)
        began, prefilled = time.perf_counter(), False
        while True:
            if free and not self.pending:  # a prompt taken is prefilled, slot or not
                room = len(free) - sum(prompt.waiting_rows for prompt in self.admitted)
                self.admitted += self.take_waiting(room, first=not self.admitted, free=free)
            if not self.admitted:
                return
            turn_over = time.perf_counter() - began >= self.last_decode_seconds
            if prefilled and self.running and turn_over:
                return
            group = self.next_group(self.admitted)
            for prompt in group:
                self.admitted.remove(prompt)
            self.prefill(group)
            prefilled = True
            for prompt in group:
                for row in prompt.job.rows:
                    if row.prompt is prompt:
                        self.place(row, free)

    def place(self, row: Row, free: list[int]) -> None:
        """A row whose prompt is prefilled: into a free slot, else to wait for one."""
        if row.job.cancelled:
            self.finish(row, "stop", notify=False)
            self.used(row.prompt)
        elif row.job.max_tokens == 0:  # only the prompt: its echo, and its scores if asked
            self.finish(row, "length")
        elif free:
            self.insert(row, free.pop(0))
        else:
            self.pending.append(row)

    def take_waiting(self, room: int, first: bool, free: list[int]) -> list[Prompt]:
        """The prompts to prefill of waiting jobs, oldest job first, as long as their rows fit
        in `room` slots (the `first` job is taken whatever its size: rows that do not fit wait
        for a slot). A job with nothing to compute (cancelled, or max_tokens 0 without
        scores) is answered at once."""
        jobs = []
        with self.condition:
            while self.waiting and (first or len(self.waiting[0].rows) <= room):
                jobs.append(self.waiting.popleft())
                first, room = False, room - len(jobs[-1].rows)
            self.metrics.waiting.set(len(self.waiting))
        prompts: list[Prompt] = []
        for job in jobs:
            if job.cancelled or not (job.max_tokens or job.scored):
                for row in job.rows:
                    self.place(row, free)
            else:
                prompts += job.prompts
        return prompts

    def next_group(self, prompts: list[Prompt]) -> list[Prompt]:
        """The next prompts to prefill: the oldest of the shortest bucket, with the next
        oldest of its bucket as far as a group size allows (a prompt to score goes alone)."""
        bucket = lambda p: prompt_bucket(len(p.tokens), self.block_size)  # noqa: E731
        first = min(prompts, key=bucket)
        if first.scored:
            return [first]
        alike = [p for p in prompts if bucket(p) == bucket(first) and not p.scored]
        size = max(s for s in self.group_sizes(bucket(first)) if s <= len(alike))
        return [first, *[p for p in alike if p is not first][: size - 1]]

    def prefill(self, group: list[Prompt]) -> None:
        """Prompts of one bucket through the model together, once for all their rows. Their
        products have a row per token, so each prompt's numbers are those it gets alone."""
        bucket = prompt_bucket(len(group[0].tokens), self.block_size)
        scored = group[0].scored  # then it is alone
        prefilled = self.engine.prefill(
            *padded([p.tokens for p in group], bucket),
            prompt_logprobs=MAX_LOGPROBS if scored else 0,
        )
        if scored:  # the prompt's own tokens scored, for its echo
            n = len(group[0].tokens)
            scores = (prefilled.token_logprobs, prefilled.top_ids, prefilled.top_logprobs)
            group[0].scores = tuple(to_host(x)[0, :n].tolist() for x in scores)
        prefilled = scoreless(prefilled)  # one insert program serves both kinds
        for row, prompt in enumerate(group):
            if prompt.job.max_tokens > 0:
                prompt.prefilled, prompt.prefilled_row = prefilled, row

    def insert(self, row: Row, slot: int) -> None:
        """The row into a slot, and its first token to its client at once (a request with
        logprobs gets it, with its log-probabilities, from the next decode call)."""
        job, settings = row.job, row.job.sampling
        sampling = SamplingParams.create(
            settings["temperature"],
            settings["top_k"] or None,
            settings["top_p"],
            settings["min_p"],
            self.tokenizer.vocab_size,
        )
        self.state, first = self.engine.insert(
            self.state,
            row.prompt.prefilled,
            row.prompt.prefilled_row,
            slot,
            job.seed,
            row.sample,
            sampling,
            job.max_tokens,
        )
        self.used(row.prompt)
        row.slot = slot
        self.running[slot] = row
        self.metrics.running.set(len(self.running))
        if job.logprobs is not None:
            return
        row.tokens.append(int(to_host(first)))
        row.early = True
        self.observe(row, 1, time.perf_counter())
        if self.cut_at_stop_string(row):
            self.state = self.engine.release(self.state, np.arange(self.slots) == slot)
            self.deliver(row, "stop")
        else:
            self.deliver(row, None)

    def used(self, prompt: Prompt) -> None:
        """One more of the prompt's rows needs its prefill no more."""
        prompt.waiting_rows -= 1
        if prompt.waiting_rows == 0:
            prompt.prefilled = None  # the device memory goes with it

    def step(self) -> tuple[int, int]:
        """K decode steps for the occupied slots, then each running row's new tokens to its
        client. Returns (requests submitted before the tokens went out, requests this call
        finished)."""
        jobs = [row.job for row in self.running.values()]
        top_k = max(job.sampling["top_k"] for job in jobs)
        top_k_bucket = 0 if not top_k else next(b for b in self.top_k_buckets() if b >= top_k)
        use_top_p = any(job.sampling["top_p"] < 1.0 for job in jobs)
        logprobs = MAX_LOGPROBS if any(job.logprobs is not None for job in jobs) else 0
        occupied = max(self.running) + 1  # every slot past the last occupied one is empty
        rows = self.slots if logprobs else next(r for r in self.row_counts if r >= occupied)
        self.state = self.with_variant(top_k_bucket, use_top_p)
        began = time.perf_counter()
        self.state, out = self.engine.decode(
            self.state, self.stop_ids, self.decode_steps, logprobs, rows
        )
        tokens, done = to_host(out.tokens), to_host(self.state.done)
        self.last_decode_seconds = time.perf_counter() - began
        arrivals, jobs_running = self.arrivals, {id(row.job) for row in self.running.values()}
        bad = to_host(self.state.bad_logits)
        if logprobs:
            chosen, top_ids = to_host(out.logprobs), to_host(out.top_ids)
            top_logprobs = to_host(out.top_logprobs)
        now = time.perf_counter()
        free = np.zeros(self.slots, bool)
        for slot, row in list(self.running.items()):
            drawn = tokens[slot] != FILL
            new = tokens[slot][drawn].tolist()
            if row.early and new:  # the first token, already sent when the row went in
                if new[0] != row.tokens[0]:
                    raise RuntimeError(f"slot {slot} drew {new[0]}, not {row.tokens[0]}")
                new, row.early = new[1:], False
            if row.job.cancelled:
                self.finish(row, "stop", notify=False)
                free[slot] = not done[slot]
                continue
            if bad[slot]:
                row.job.notify(("error", "the model produced NaN or infinite logits"))
                row.job.cancelled = True
                self.finish(row, "stop", notify=False)
                free[slot] = not done[slot]
                continue
            row.tokens += new
            if logprobs:
                row.logprobs += chosen[slot][drawn].tolist()
                row.top += [
                    list(zip(ids, lps, strict=True))
                    for ids, lps in zip(
                        top_ids[slot][drawn].tolist(),
                        top_logprobs[slot][drawn].tolist(),
                        strict=True,
                    )
                ]
            self.observe(row, len(new), now)
            reason = None
            if done[slot]:
                ended_on_stop_id = row.tokens and row.tokens[-1] == self.tokenizer.eot_id
                reason = "stop" if ended_on_stop_id else "length"
            if self.cut_at_stop_string(row):
                reason, free[slot] = "stop", not done[slot]
            self.deliver(row, reason)
        if free.any():
            self.state = self.engine.release(self.state, free)
        self.metrics.programs.set(self.engine.compile_count)
        jobs_left = {id(row.job) for row in [*self.running.values(), *self.pending]}
        return arrivals, len(jobs_running - jobs_left)

    def wait_for_follow_ups(self, arrivals: int, finished: int) -> None:
        """Before the next decode call, give the clients of requests that just finished a
        moment (FOLLOW_UP_WAIT of the last call) to send their next ones, if slots are free."""
        if not finished or len(self.running) == self.slots:
            return
        with self.condition:
            self.condition.wait_for(
                lambda: self.arrivals >= arrivals + finished or self.stopping,
                timeout=FOLLOW_UP_WAIT * self.last_decode_seconds,
            )

    def observe(self, row: Row, count: int, now: float) -> None:
        if not count:
            return
        job = row.job
        if job.first_token is None:
            job.first_token = now
            self.metrics.ttft.observe(now - job.arrived)
        if row.last_delivery is not None:
            for _ in range(count):
                self.metrics.itl.observe((now - row.last_delivery) / count)
        row.last_delivery = now
        self.metrics.tokens.inc(count)

    # ------------------------------------------------------------------ tokens to text

    def cut_at_stop_string(self, row: Row) -> bool:
        """Whether a stop string has appeared; if so the row's tokens end with the one that
        completed it (the text is cut before the stop, as OpenAI returns it)."""
        stops = row.job.stops
        if not stops or not any(s in self.tokenizer.decode(row.tokens) for s in stops):
            return False
        for n in range(max(1, row.sent_tokens), len(row.tokens) + 1):
            if any(s in self.tokenizer.decode(row.tokens[:n]) for s in stops):
                del row.tokens[n:], row.logprobs[n:], row.top[n:]
                return True
        return False

    def completion_text(self, row: Row, final: bool) -> tuple[str, int]:
        """(the text that may go out now, tokens it covers). Held back while unfinished: a
        character whose bytes are not all there, and an end that may begin a stop string."""
        tokens = row.tokens
        if tokens and tokens[-1] == self.tokenizer.eot_id:
            tokens = tokens[:-1]  # counted, never shown
        text = self.tokenizer.decode(tokens)
        stops = row.job.stops
        if final:
            cuts = [text.find(s) for s in stops if s in text]
            return (text[: min(cuts)] if cuts else text), len(row.tokens)
        for count in range(len(tokens), row.sent_tokens - 1, -1):
            text = self.tokenizer.decode(tokens[:count])
            unfinished = text.endswith("\ufffd") or any(
                text.endswith(s[:i]) for s in stops for i in range(1, len(s))
            )
            if not unfinished:
                return text, count
        return row.sent_text, row.sent_tokens

    def deliver(self, row: Row, finish_reason: str | None) -> None:
        text, count = self.completion_text(row, final=finish_reason is not None)
        piece = text[len(row.sent_text) :] if text.startswith(row.sent_text) else ""
        first, last = row.sent_tokens, count
        row.sent_text, row.sent_tokens = text, count
        if piece or finish_reason or last > first:
            ids, lps, top = row.tokens[first:last], row.logprobs[first:last], row.top[first:last]
            row.job.notify(("piece", Piece(row.index, piece, ids, lps, top, finish_reason)))
        if finish_reason:
            self.finish(row, finish_reason)

    def finish(self, row: Row, reason: str, notify: bool = True) -> None:
        row.finish_reason = reason
        if row.slot is not None:
            del self.running[row.slot]
            row.slot = None
            self.metrics.running.set(len(self.running))
        elif notify:  # never ran (max_tokens 0): its only piece is the end
            row.job.notify(("piece", Piece(row.index, "", [], [], [], reason)))
        job = row.job
        if job.finished:
            if not job.cancelled:
                job.notify(("done",))
            self.log_job(job)

    def log_job(self, job: Job) -> None:
        tokens = sum(len(r.tokens) for r in job.rows)
        elapsed = time.perf_counter() - job.arrived
        ttft = f"{job.first_token - job.arrived:.3f}" if job.first_token else "-"
        status = "cancelled" if job.cancelled else "done"
        self.log(
            f"{job.id} {status}: prompt {sum(p.given_tokens for p in job.prompts)} tokens, "
            f"completion {tokens} tokens, ttft {ttft} s, {tokens / max(elapsed, 1e-9):.1f} tok/s"
        )


def scoreless(prefilled: Prefilled) -> Prefilled:
    """The prefilled rows without prompt scores: one insert program serves both kinds."""
    n = prefilled.lengths.shape[0]
    return dataclasses.replace(
        prefilled,
        token_logprobs=jnp.zeros((n, 0), jnp.float32),
        top_ids=jnp.zeros((n, 0, 0), jnp.int32),
        top_logprobs=jnp.zeros((n, 0, 0), jnp.float32),
    )

"""The scheduler's order of work, driven in this process without its thread or a socket."""

import threading
import time

import nanogpt_jax
from nanogpt_jax.serve.metrics import Metrics
from nanogpt_jax.serve.scheduler import Job, Prompt, Scheduler


def job(name: str, length: int, events: list) -> Job:
    tokens = [(7 * i + len(name)) % 1000 for i in range(length)]
    return Job(
        id=name,
        prompts=[Prompt(tokens=tokens, text="", given_tokens=length)],
        n=1,
        max_tokens=8,
        sampling=dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0),
        stops=[],
        seed=0,
        logprobs=None,
        echo=False,
        notify=lambda event: events.append((name, event[0])),
    )


def test_a_short_prompt_arriving_during_a_burst_of_long_ones_is_prefilled_next(gpt2_checkpoint):
    path, _ = gpt2_checkpoint
    bundle = nanogpt_jax.load(path)  # block_size 64: prompt buckets 16, 32, 64
    # 64-slot prefill groups: the 64-token bucket's prompts go one by one
    scheduler = Scheduler(bundle, 8, 64, 4, Metrics.create(), lambda message: None, 64)
    block_size = bundle.config.block_size
    scheduler.state = scheduler.engine.empty(scheduler.slots, block_size, block_size)
    scheduler.last_decode_seconds = float("inf")  # one pass admits them all
    events, order = [], []
    prefill = scheduler.prefill

    def recording(group):
        order.extend(prompt.job.id for prompt in group)
        if len(order) == 1:  # a short request arrives while the first long prompt is prefilled
            scheduler.submit(job("short", 5, events))
        prefill(group)

    scheduler.prefill = recording
    for name in ("long0", "long1", "long2"):
        scheduler.submit(job(name, 40, events))
    scheduler.admit()

    assert order == ["long0", "short", "long1", "long2"]
    assert sorted(row.job.id for row in scheduler.running.values()) == sorted(order)
    # each row's first token went out as it was inserted, in the order of the prefills
    assert [name for name, kind in events if kind == "piece"] == order


def admitted_alone_or_together(bundle, lengths: dict, group_slots: int):
    """(the prefill calls' groups, each job's tokens) of the jobs admitted in one pass."""
    scheduler = Scheduler(bundle, 16, 64, 4, Metrics.create(), lambda message: None, group_slots)
    block_size = bundle.config.block_size
    scheduler.state = scheduler.engine.empty(scheduler.slots, block_size, block_size)
    scheduler.last_decode_seconds = float("inf")  # one pass admits them all
    groups, jobs = [], {name: job(name, length, []) for name, length in lengths.items()}
    prefill = scheduler.prefill

    def recording(group):
        groups.append([prompt.job.id for prompt in group])
        prefill(group)

    scheduler.prefill = recording
    for submitted in jobs.values():
        scheduler.submit(submitted)
    scheduler.admit()
    while scheduler.running:
        scheduler.step()
    return groups, {name: submitted.rows[0].tokens for name, submitted in jobs.items()}


def test_short_prompts_of_a_bucket_are_prefilled_together_oldest_first(gpt2_checkpoint):
    path, _ = gpt2_checkpoint
    bundle = nanogpt_jax.load(path)  # block_size 64: prompt buckets 16, 32, 64
    scheduler = Scheduler(bundle, 16, 64, 4, Metrics.create(), lambda message: None, 64)
    assert [scheduler.group_sizes(b) for b in (16, 32, 64)] == [[1, 2, 4], [1, 2], [1]]
    lengths = {"a": 40, "b": 20, "c": 9, "d": 3, "e": 30, "f": 12, "g": 16, "h": 1, "i": 5}

    groups, together = admitted_alone_or_together(bundle, lengths, group_slots=64)
    # bucket 16 (c d f g h i): four, then two; bucket 32 (b e): a pair; bucket 64 (a) alone
    assert groups == [["c", "d", "f", "g"], ["h", "i"], ["b", "e"], ["a"]]
    groups, alone = admitted_alone_or_together(bundle, lengths, group_slots=16)
    assert groups == [[name] for name in "cdfghibea"]
    assert all(len(tokens) == 8 for tokens in together.values())
    assert together == alone


def test_a_burst_takes_turns_with_the_running_rows(gpt2_checkpoint):
    """While rows run, a pass prefills no longer than the last decode call took: after a
    short call, one group, then the running rows decode; the burst's rows start in
    different calls, each with the tokens it gets when the burst is admitted at once."""
    path, _ = gpt2_checkpoint
    bundle = nanogpt_jax.load(path)
    lengths = {"a": 40, "b": 20, "c": 9, "d": 3}
    _, at_once = admitted_alone_or_together(bundle, lengths, group_slots=16)

    scheduler = Scheduler(bundle, 16, 64, 2, Metrics.create(), lambda message: None, 16)
    block_size = bundle.config.block_size
    scheduler.state = scheduler.engine.empty(scheduler.slots, block_size, block_size)
    jobs = {name: job(name, length, []) for name, length in lengths.items()}
    passes, prefill, step = [], scheduler.prefill, scheduler.step

    def recording(group):
        passes[-1].extend(prompt.job.id for prompt in group)
        prefill(group)

    def short_call():
        result = step()
        scheduler.last_decode_seconds = 0.0  # as if the call took no time
        return result

    scheduler.prefill, scheduler.step = recording, short_call
    for submitted in jobs.values():
        scheduler.submit(submitted)
    while scheduler.busy:
        passes.append([])
        scheduler.admit()
        if scheduler.running:
            scheduler.step()

    assert [p for p in passes if p] == [["c"], ["d"], ["b"], ["a"]]  # shortest bucket, oldest
    assert {name: submitted.rows[0].tokens for name, submitted in jobs.items()} == at_once


def test_a_decode_call_waits_briefly_for_the_finished_requests_next_ones(gpt2_checkpoint):
    path, _ = gpt2_checkpoint
    bundle = nanogpt_jax.load(path)
    scheduler = Scheduler(bundle, 8, 64, 4, Metrics.create(), lambda message: None, 64)
    scheduler.last_decode_seconds = 100.0  # a wait of up to 15 s
    follow_up = threading.Timer(0.05, scheduler.submit, [job("next", 5, [])])
    began = time.perf_counter()
    follow_up.start()
    scheduler.wait_for_follow_ups(scheduler.arrivals, finished=1)
    assert scheduler.arrivals == 1 and time.perf_counter() - began < 10  # woken by the submit

    scheduler.last_decode_seconds = 0.2  # no follow-up: the call goes on after 30 ms
    began = time.perf_counter()
    scheduler.waiting.clear()
    scheduler.wait_for_follow_ups(scheduler.arrivals, finished=1)
    assert 0.03 <= time.perf_counter() - began < 10

    scheduler.last_decode_seconds = 100.0  # no slot free: no wait at all
    scheduler.running = dict.fromkeys(range(scheduler.slots))
    began = time.perf_counter()
    scheduler.wait_for_follow_ups(scheduler.arrivals, finished=1)
    assert time.perf_counter() - began < 10

"""The scheduler's order of work, driven in this process without its thread or a socket."""

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

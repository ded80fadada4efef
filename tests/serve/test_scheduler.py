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
    scheduler = Scheduler(bundle, 8, 64, 4, Metrics.create(), log=lambda message: None)
    block_size = bundle.config.block_size
    scheduler.state = scheduler.engine.empty(scheduler.slots, block_size, block_size)
    events, order = [], []
    prefill = scheduler.prefill

    def recording(prompt):
        order.append(prompt.job.id)
        if len(order) == 1:  # a short request arrives while the first long prompt is prefilled
            scheduler.submit(job("short", 5, events))
        prefill(prompt)

    scheduler.prefill = recording
    for name in ("long0", "long1", "long2"):
        scheduler.submit(job(name, 40, events))
    scheduler.admit()

    assert order == ["long0", "short", "long1", "long2"]
    assert sorted(row.job.id for row in scheduler.running.values()) == sorted(order)
    # each row's first token went out as it was inserted, in the order of the prefills
    assert [name for name, kind in events if kind == "piece"] == order

"""Text generation from the host: prompts in, texts out.

    prompts -> token ids -> crop to block_size -> right-pad to a bucket -> prefill
            -> scan over new tokens [sample -> write -> model step on the new token] -> text

Compiled programs depend only on shapes: (batch, prompt bucket, new-token bucket) and the static
sampling switches. Prompt lengths and max_new_tokens inside a bucket, temperature, top_k within
its power-of-two bucket, top_p, min_p and the seed reuse one program.

Keys: `seed` gives the root key; row i of the request (sample i) draws from its own stream
`fold_in(root, i)`, and its t-th new token from `fold_in(stream_i, t)`. A sample's tokens thus
depend on neither its batch, nor the padding around it, nor the number of samples asked for.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nanogpt_jax.bundle import ModelBundle, as_token_rows
from nanogpt_jax.engine import FILL, Engine, engine_of
from nanogpt_jax.errors import UserError
from nanogpt_jax.sampling import SamplingParams, next_power_of_two
from nanogpt_jax.sharding import to_host

MIN_PROMPT_BUCKET = 16
MIN_NEW_TOKENS_BUCKET = 16


@dataclasses.dataclass
class Generation:
    """Generated rows. `tokens` is (rows, longest) int32: prompt then new tokens, right-padded
    with -1 after rows that stopped early or had shorter prompts; `lengths` are the real ones."""

    tokens: np.ndarray
    lengths: np.ndarray
    prompt_lengths: np.ndarray
    texts: list[str]
    compile_seconds: float
    generate_seconds: float
    prompts: list[str]  # the prompts as text

    @property
    def new_token_count(self) -> int:
        return int(np.sum(self.lengths - self.prompt_lengths))

    @property
    def tokens_per_second(self) -> float:
        return self.new_token_count / max(self.generate_seconds, 1e-9)

    def completions(self) -> list[str]:
        """Only the generated part of each text."""
        return [text[len(prefix) :] for text, prefix in zip(self.texts, self.prompts, strict=True)]


def generate(
    bundle: ModelBundle,
    prompts,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    min_p: float = 0.0,
    stop: Sequence[str | int] = (),
    seed: int = 0,
    batch_size: int | None = None,
    on_text: Callable[[int, str], None] | None = None,
    chunk_size: int | None = None,
    first_row: int = 0,
) -> Generation:
    """Sample continuations of one or many prompts.

    Args:
      prompts: a string, a list of strings, or a list of token-id lists; lengths may differ.
        Row i of the request is sample i (repeat a prompt to draw several samples).
      max_new_tokens: new tokens per row, at most (fewer when a row hits a stop).
      temperature, top_k, top_p, min_p: see `nanogpt_jax.sampling` (temperature 0 is greedy).
      stop: strings and/or token ids that end a row; the stop itself is kept in the output.
      seed: root of all randomness; sample i's text depends only on seed, i and the options.
      batch_size: rows run together (default: all of them).
      on_text: streaming callback `(row, new_text)`, called after every chunk of steps.
      chunk_size: decode steps per compiled call (default: all at once, 8 when streaming).
      first_row: index of the first prompt's sample in a larger request (its key stream).
    Returns:
      a Generation with `.tokens`, `.lengths` and `.texts`.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(seed, int):
        raise UserError(f"seed must be an integer, got {seed!r}")
    tokenizer, config = bundle.tokenizer, bundle.config
    rows = as_token_rows(prompts, tokenizer)
    if not rows:
        raise UserError("no prompts given")
    for row in rows:
        if not row:
            raise UserError(
                "empty prompt: this tokenizer has no beginning-of-text token to start from; "
                "give at least one character"
                if tokenizer.eot_id is None
                else "empty prompt (use '<|endoftext|>' to start from nothing)"
            )
        if min(row) < 0 or max(row) >= tokenizer.vocab_size:
            raise UserError(f"prompt token ids must lie in [0, {tokenizer.vocab_size})")
    if any(len(row) > config.block_size for row in rows):
        warnings.warn(
            f"prompt longer than block_size={config.block_size} tokens: the model sees only "
            "its last block_size tokens",
            stacklevel=2,
        )
    sampling = SamplingParams.create(temperature, top_k, top_p, min_p, tokenizer.vocab_size)
    stop_ids, stop_texts = split_stops(stop, tokenizer)
    batch_size = len(rows) if batch_size is None else batch_size
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    if chunk_size is None:
        # one call over the whole new-token bucket (it ends within a group of steps of the
        # last row's stop), or chunks when the host must look at the text in between
        chunk_size = 8 if on_text else (32 if stop_texts else max_new_tokens)

    engine = engine_of(bundle)
    compile_before = engine.compile_seconds
    began = time.perf_counter()
    # every batch has the same number of rows (the last is padded), a multiple of the data axis
    data_size = 1 if bundle.mesh is None else bundle.mesh.shape["data"]
    padded_rows = -(-min(batch_size, len(rows)) // data_size) * data_size
    new_tokens: list[list[int]] = []
    for first in range(0, len(rows), batch_size):
        batch = rows[first : first + batch_size]
        new_tokens += generate_batch(
            engine,
            batch,
            row_ids=range(first_row + first, first_row + first + len(batch)),
            padded_rows=padded_rows,
            seed=seed,
            sampling=sampling,
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
            stop_texts=stop_texts,
            chunk_size=chunk_size,
            on_text=on_text,
        )
    elapsed = time.perf_counter() - began
    compile_seconds = engine.compile_seconds - compile_before
    return assemble(rows, new_tokens, tokenizer, compile_seconds, elapsed - compile_seconds)


def split_stops(stop, tokenizer) -> tuple[jax.Array, list[str]]:
    """Token ids stop on the device; strings are matched on the decoded text, except special
    tokens such as '<|endoftext|>', which are ids."""
    if isinstance(stop, str | int):
        stop = [stop]
    ids, texts = [], []
    for item in stop:
        if isinstance(item, int) and not isinstance(item, bool):
            ids.append(item)
        elif isinstance(item, str) and item:
            if item == "<|endoftext|>" and tokenizer.eot_id is not None:
                ids.append(tokenizer.eot_id)
            else:
                texts.append(item)
        else:
            raise UserError(f"stop must be non-empty strings or token ids, got {item!r}")
    return jnp.asarray(ids or [FILL], jnp.int32), texts


def prompt_bucket(length: int, block_size: int) -> int:
    """Slots a prompt of `length` tokens is padded to: a power of two, at most block_size."""
    return min(max(MIN_PROMPT_BUCKET, next_power_of_two(length)), block_size)


def padded(prompts: list[list[int]], bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, lengths) of prompts right-padded to `bucket` slots, for a prefill."""
    tokens = np.zeros((len(prompts), bucket), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    return tokens, np.array([len(p) for p in prompts], np.int32)


def cache_plan(prompt_slots: int, new_slots: int, block_size: int) -> tuple[int, int]:
    """(cache slots, window): room for prompt and new tokens while they fit block_size; past
    it, a window of the last block_size tokens for nanoGPT's recompute."""
    if prompt_slots + new_slots <= block_size:
        return prompt_slots + new_slots, 0
    return block_size, block_size


def generate_batch(
    engine: Engine,
    batch: list[list[int]],
    *,
    row_ids: range,
    padded_rows: int,
    seed: int,
    sampling: SamplingParams,
    max_new_tokens: int,
    stop_ids,
    stop_texts: list[str],
    chunk_size: int,
    on_text,
) -> list[list[int]]:
    """New tokens for each row of one batch (the rows' prompts are `batch`)."""
    config, tokenizer = engine.bundle.config, engine.bundle.tokenizer
    cropped = [row[-config.block_size :] for row in batch]
    prompt_slots = prompt_bucket(max(map(len, cropped)), config.block_size)
    new_slots = max(MIN_NEW_TOKENS_BUCKET, next_power_of_two(max_new_tokens))
    chunk_size = min(next_power_of_two(chunk_size), new_slots)
    num_slots, window = cache_plan(prompt_slots, new_slots, config.block_size)
    # padding rows repeat the first prompt and key stream; their output is dropped
    padding = padded_rows - len(cropped)
    tokens, lengths = padded(cropped + [cropped[0]] * padding, prompt_slots)
    ids = np.array(list(row_ids) + [row_ids[0]] * padding, np.int32)
    max_new = np.full((padded_rows,), max_new_tokens, np.int32)
    state = engine.start(
        tokens, lengths, seed, ids, sampling.for_rows(padded_rows), max_new, num_slots, window
    )
    new = [[] for _ in batch]
    emitted = [0] * len(batch)
    steps = 0
    while steps < max_new_tokens:
        state, out = engine.decode(state, stop_ids, chunk_size)
        steps += chunk_size
        if bool(np.any(to_host(state.bad_logits))):
            raise UserError("the model produced NaN or infinite logits; the checkpoint is broken")
        for row, drawn in zip(new, to_host(out.tokens)[: len(batch)], strict=False):
            row += drawn[drawn != FILL].tolist()
        done = to_host(state.done)
        if not (on_text or stop_texts):
            if np.all(done):
                break
            continue
        stopped = [stop_index(tokenizer, row, stop_texts) for row in new]
        if on_text:
            finished = steps >= max_new_tokens or bool(np.all(done))
            for b, row in enumerate(new):
                text = tokenizer.decode(row[: stopped[b]])
                if not finished:  # hold back a character whose bytes are not all there yet
                    text = text.rstrip("\ufffd")
                on_text(row_ids[b], text[emitted[b] :])
                emitted[b] = max(emitted[b], len(text))
        if any(s is not None for s in stopped):
            free = np.zeros(padded_rows, bool)
            free[: len(batch)] = [s is not None for s in stopped]
            state = engine.release(state, free)
            done = done | free
        if np.all(done):
            break
    return [row[: stop_index(tokenizer, row, stop_texts)] for row in new]


def stop_index(tokenizer, tokens: list[int], stop_texts: list[str]) -> int | None:
    """Length of the shortest prefix of `tokens` whose text contains a stop string, if any."""
    if not stop_texts:
        return None
    text = tokenizer.decode(tokens)
    if not any(s in text for s in stop_texts):
        return None
    for n in range(1, len(tokens) + 1):
        prefix = tokenizer.decode(tokens[:n])
        if any(s in prefix for s in stop_texts):
            return n
    return None


def merge_generations(parts: list[Generation]) -> Generation:
    """One Generation from several, rows in order."""
    width = max(part.tokens.shape[1] for part in parts)
    return Generation(
        tokens=np.concatenate(
            [
                np.pad(p.tokens, ((0, 0), (0, width - p.tokens.shape[1])), constant_values=FILL)
                for p in parts
            ]
        ),
        lengths=np.concatenate([p.lengths for p in parts]),
        prompt_lengths=np.concatenate([p.prompt_lengths for p in parts]),
        texts=[t for p in parts for t in p.texts],
        compile_seconds=sum(p.compile_seconds for p in parts),
        generate_seconds=sum(p.generate_seconds for p in parts),
        prompts=[t for p in parts for t in p.prompts],
    )


def assemble(rows, new_tokens, tokenizer, compile_seconds, generate_seconds) -> Generation:
    full = [row + new for row, new in zip(rows, new_tokens, strict=True)]
    lengths = np.array([len(r) for r in full])
    tokens = np.full((len(full), lengths.max()), FILL, np.int32)
    for i, row in enumerate(full):
        tokens[i, : len(row)] = row
    return Generation(
        tokens=tokens,
        lengths=lengths,
        prompt_lengths=np.array([len(r) for r in rows]),
        texts=[tokenizer.decode(r) for r in full],
        compile_seconds=compile_seconds,
        generate_seconds=generate_seconds,
        prompts=[tokenizer.decode(r) for r in rows],
    )

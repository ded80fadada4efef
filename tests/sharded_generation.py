"""Runs in its own process with 8 host devices (see test_sharding.py): generates with one
checkpoint under several mesh layouts, and one whose vocabulary and heads do not divide over
`model:2`, and prints tokens and shardings as JSON."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402

import nanogpt_jax  # noqa: E402
from nanogpt_jax.engine import engine_of  # noqa: E402
from nanogpt_jax.sharding import make_mesh  # noqa: E402

PROMPTS = ["ROMEO:", "KING HENRY:\nWhat", "O", "Thou art"]


def spec_of(array) -> list:
    return [str(axis) for axis in array.sharding.spec]


def main(checkpoint: str, odd_checkpoint: str) -> None:
    assert len(jax.devices()) == 8
    out = {
        "even": layouts(checkpoint, [None, "data:8", "data:4,model:2", "data:2,model:4"]),
        "odd": layouts(odd_checkpoint, [None, "data:4,model:2"]),
    }
    print(json.dumps(out))


def layouts(checkpoint: str, specs: list) -> dict:
    out = {}
    for layout in specs:
        mesh = None if layout is None else make_mesh(layout)
        bundle = nanogpt_jax.load(checkpoint, mesh=mesh)
        greedy = bundle.generate(PROMPTS, max_new_tokens=24, temperature=0.0)
        sampled = bundle.generate(PROMPTS, max_new_tokens=24, temperature=1.0, top_k=20, seed=3)
        block = bundle.params["h"][0]
        record = dict(
            greedy=greedy.tokens.tolist(),
            sampled=sampled.tokens.tolist(),
            prompt_lengths=greedy.prompt_lengths.tolist(),
            lengths=[greedy.lengths.tolist(), sampled.lengths.tolist()],
        )
        if mesh is not None:
            record["params"] = {
                "attn.c_attn.weight": spec_of(block["attn"]["c_attn"]["weight"][...]),
                "attn.c_attn.shape": list(block["attn"]["c_attn"]["weight"][...].shape),
                "attn.c_proj.weight": spec_of(block["attn"]["c_proj"]["weight"][...]),
                "mlp.c_fc.weight": spec_of(block["mlp"]["c_fc"]["weight"][...]),
                "mlp.c_proj.weight": spec_of(block["mlp"]["c_proj"]["weight"][...]),
                "wte": spec_of(bundle.params["wte"]["embedding"][...]),
                "wpe": spec_of(bundle.params["wpe"]["embedding"][...]),
                "ln_1": spec_of(block["ln_1"]["scale"][...]),
            }
            engine = engine_of(bundle)
            state = engine.prefill(*padded_prompt(bundle, len(mesh.devices.flat)))
            record["cache"] = spec_of(state.k[0])
            record["cache_shape"] = list(state.k[0].shape)
        out[layout or "single"] = record
    return out


def padded_prompt(bundle, rows):
    import numpy as np

    tokens = np.zeros((rows, 16), np.int32)
    tokens[:, :2] = bundle.tokenizer.encode("Hi")
    return tokens, np.full((rows,), 2, np.int32)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

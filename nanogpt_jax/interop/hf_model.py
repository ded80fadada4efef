"""This project's parameters as a Hugging Face `GPT2LMHeadModel`, for side-by-side runs.

The inverse of `convert`'s table: GPT-2's names, Conv1D weights stored (in, out), the transpose
of this model's (out, in), and lm_head tied to wte. Configs without biases (nanoGPT's
`bias=False`) get zero biases, which Hugging Face's GPT-2 always has.
"""

from __future__ import annotations

import torch

from nanogpt_jax.config import GPTConfig
from nanogpt_jax.interop.convert import is_linear_weight
from nanogpt_jax.interop.torch_reference import state_dict_from_params


def hf_state_dict(config: GPTConfig, params: dict, vocab_size: int | None = None) -> dict:
    """Hugging Face GPT-2 tensors (float32) from a parameter tree.

    vocab_size: keep only the first `vocab_size` rows of wte (a tokenizer's ids), dropping the
    padding rows of a nanoGPT vocabulary so that argmax never lands on them.
    """
    state = {}
    for name, tensor in state_dict_from_params(params).items():  # nanoGPT's names and layouts
        if name == "lm_head.weight":
            continue  # tied again below, after wte is cropped
        if is_linear_weight(name.removeprefix("transformer.")):
            tensor = tensor.T.contiguous()  # (out, in) -> Conv1D's (in, out)
        state[name] = tensor
    if vocab_size is not None:
        state["transformer.wte.weight"] = state["transformer.wte.weight"][:vocab_size].clone()
    if not config.bias:
        for i in range(config.n_layer):
            widths = {"attn.c_attn": 3, "attn.c_proj": 1, "mlp.c_fc": 4, "mlp.c_proj": 1}
            for layer, multiple in widths.items():
                state[f"transformer.h.{i}.{layer}.bias"] = torch.zeros(multiple * config.n_embd)
            for norm in ("ln_1", "ln_2"):
                state[f"transformer.h.{i}.{norm}.bias"] = torch.zeros(config.n_embd)
        state["transformer.ln_f.bias"] = torch.zeros(config.n_embd)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def to_hf(config: GPTConfig, params: dict, vocab_size: int | None = None):
    """A `GPT2LMHeadModel` (eval mode, float32, CPU) holding the same weights.

    It never stops at an end-of-text id: the benchmark asks every implementation for exactly
    the same number of tokens.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    state = hf_state_dict(config, params, vocab_size)
    hf_config = GPT2Config(
        vocab_size=state["transformer.wte.weight"].shape[0],
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        activation_function=config.activation_function,
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    # built without memory, then given our tensors: no time spent on a random init
    with torch.device("meta"):
        model = GPT2LMHeadModel(hf_config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()

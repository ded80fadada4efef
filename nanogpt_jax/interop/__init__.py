"""PyTorch interoperation: GPT-2 and nanoGPT weights in, nanoGPT and Hugging Face files out.

    convert.py          Hugging Face / nanoGPT PyTorch weights to this project's parameters
    export.py           and back: nanoGPT's ckpt.pt (+ meta.pkl), a Hugging Face directory
    hf_model.py         parameters as a Hugging Face GPT2LMHeadModel
    torch_reference.py  nanoGPT's model and generate in PyTorch, for tests and the benchmark

`load()` reaches into `convert` when it is given PyTorch weights; `convert` imports torch and
safetensors only once a file must be read, so sampling from a converted checkpoint never does.
"""

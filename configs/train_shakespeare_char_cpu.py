# nanoGPT's CPU quick run of the Shakespeare baby GPT (its README, "I only have a MacBook"):
#   python scripts/train.py configs/train_shakespeare_char.py configs/train_shakespeare_char_cpu.py
# Later files and --flags override earlier ones. Reaches val loss ~1.88 in a few minutes.

device = "cpu"
eval_iters = 20
log_interval = 1
block_size = 64
batch_size = 12
n_layer = 4
n_head = 4
n_embd = 128
max_iters = 2000
lr_decay_iters = 2000
dropout = 0.0

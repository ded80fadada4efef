# The built-in model nanogpt_jax/pretrained/shakespeare-char (0.83M parameters, 3 MB), small
# enough to ship inside the package and to train on two CPU cores. It was made in two stages,
# the cosine schedule shortened to 3000 iterations at the 1500-iteration checkpoint to save
# CPU time (docs/training.md):
#   python scripts/train.py configs/train_shakespeare_char.py configs/shakespeare_char_builtin.py \
#       --max_iters=1500
#   python scripts/train.py configs/train_shakespeare_char.py configs/shakespeare_char_builtin.py \
#       --init_from=resume --max_iters=3000 --lr_decay_iters=3000
# Run without flags, this file trains 5000 iterations in one go.

out_dir = "out-shakespeare-char-builtin"
device = "cpu"
eval_interval = 500
eval_iters = 50
log_interval = 50
block_size = 256
batch_size = 32
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
max_iters = 5000
lr_decay_iters = 5000

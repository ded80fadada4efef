# nanoGPT's config/finetune_shakespeare.py: GPT-2 XL fine-tuned on tiny Shakespeare in GPT-2 BPE.
#   python scripts/prepare_shakespeare.py              # data/shakespeare: train.bin, val.bin
#   python scripts/train.py configs/finetune_shakespeare.py
#   python scripts/sample.py --out_dir=out-shakespeare --start="ROMEO:" --num_samples=1
# nanoGPT names the wandb run 'ft-' + str(time.time()); a parsed config holds literals only.

out_dir = "out-shakespeare"
eval_interval = 5
eval_iters = 40
wandb_log = False  # feel free to turn on
wandb_project = "shakespeare"
wandb_run_name = "ft"

dataset = "shakespeare"
init_from = "gpt2-xl"  # this is the largest GPT-2 model

# only save checkpoints if the validation loss improves
always_save_checkpoint = False

# the number of examples per iter:
# 1 batch_size * 32 grad_accum * 1024 tokens = 32,768 tokens/iter
# shakespeare has 301,966 tokens, so 1 epoch ~= 9.2 iters
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# finetune at constant LR
learning_rate = 3e-5
decay_lr = False

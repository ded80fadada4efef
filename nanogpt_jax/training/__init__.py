"""Training a GPT as nanoGPT's train.py does: `loop.train(TrainConfig)` on nanoGPT's data layout.

config.py         TrainConfig: nanoGPT's settings and defaults
data.py           train.bin / val.bin / meta.pkl, and reproducible batches
start.py          a new model, a resumed run, or pretrained weights to fine-tune
step.py           the jitted optimizer step and evaluation losses
optim.py          AdamW and the learning-rate schedule
run_directory.py  out_dir: checkpoints with digests, the best parameters, metrics
loop.py           the loop that ties them together
export.py         a run as an inference checkpoint, with its whole-val-split loss
"""

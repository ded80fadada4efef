"""Training on tiny configs: learning, exact resumption, checkpoints that load and sample,
fine-tuning, nanoGPT's optimizer settings, and one-line errors for bad input."""

import json
import math
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SHAKESPEARE, assert_one_line_error, hf_gpt2, run_script
from flax import nnx

import nanogpt_jax
from nanogpt_jax.checkpoint import abstract_model, params_dir, params_of
from nanogpt_jax.commands.train import main as train_main
from nanogpt_jax.config import GPTConfig
from nanogpt_jax.errors import UserError
from nanogpt_jax.flags import parse_flags
from nanogpt_jax.model import GPT
from nanogpt_jax.training.config import TrainConfig
from nanogpt_jax.training.data import prepare_bpe_dataset, prepare_char_dataset
from nanogpt_jax.training.loop import train
from nanogpt_jax.training.optim import decays, learning_rate_schedule, make_optimizer
from nanogpt_jax.training.step import make_train_step

MAX_ITERS = 20


@pytest.fixture(scope="module", autouse=True)
def compilation_cache():
    """Runs of one shape compile the same train step: later ones read it from disk."""
    from nanogpt_jax.engine import enable_persistent_compilation_cache

    enable_persistent_compilation_cache()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shakespeare_char")
    prepare_char_dataset(SHAKESPEARE.read_text(), directory)
    return directory


def tiny(out_dir, data_dir, **overrides) -> TrainConfig:
    """configs/train_shakespeare_char.py shrunk: dropout and gradient accumulation stay on, so
    that the dropout keys and the micro-step streams are exercised."""
    settings = dict(
        out_dir=str(out_dir),
        data_dir=str(data_dir),
        dataset="shakespeare_char",
        eval_interval=10,
        eval_iters=2,
        log_interval=1,
        gradient_accumulation_steps=2,
        batch_size=4,
        block_size=32,
        n_layer=2,
        n_head=2,
        n_embd=32,
        dropout=0.1,
        learning_rate=1e-2,
        max_iters=MAX_ITERS,
        lr_decay_iters=MAX_ITERS,
        warmup_iters=5,
        min_lr=1e-3,
        beta2=0.99,
    )
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_dir):
    """MAX_ITERS iterations in one go: (config, result)."""
    config = tiny(tmp_path_factory.mktemp("straight"), data_dir)
    return config, train(config, log=lambda line: None)


def test_loss_decreases_and_metrics_are_written(straight_run):
    config, result = straight_run
    first, last = result.evaluations[0], result.evaluations[-1]
    assert (first["iter"], last["iter"]) == (0, MAX_ITERS)
    assert first["val_loss"] == pytest.approx(math.log(65), abs=0.2)  # uniform at init
    assert last["val_loss"] < first["val_loss"] - 0.5
    assert result.losses[MAX_ITERS - 1] < result.losses[0] - 0.5
    lines = (Path(config.out_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["iter"] for r in records] == [0, 10, 20]
    assert set(records[0]) == {"iter", "train_loss", "val_loss", "lr", "elapsed_s"}
    assert records == result.evaluations


def test_out_dir_loads_as_a_model(straight_run):
    config, result = straight_run
    assert params_dir(config.out_dir).parts[-3:] == ("checkpoints", str(MAX_ITERS), "params")
    bundle = nanogpt_jax.load(config.out_dir)
    assert bundle.config.block_size == 32 and bundle.tokenizer.vocab_size == 65
    assert bundle.info["iter"] == MAX_ITERS
    assert bundle.info["val_loss"] == result.evaluations[-1]["val_loss"]
    ids = np.asarray([bundle.tokenizer.encode("ROMEO:")])
    assert bundle.logits(ids).shape == (1, 6, 65)


def test_sample_script_reads_the_training_out_dir(straight_run):
    config, _ = straight_run
    result = run_script(
        "sample",
        f"--out_dir={config.out_dir}",
        "--start=ROMEO:",
        "--num_samples=1",
        "--max_new_tokens=20",
        "--temperature=0.8",
        "--top_k=50",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:")


def test_resume_continues_exactly(straight_run, tmp_path, data_dir):
    straight_config, straight = straight_run
    # the second half resumes a run that stopped at MAX_ITERS / 2; always_save_checkpoint=False
    # changes which params out_dir serves, never the training itself
    half = tiny(tmp_path, data_dir, max_iters=MAX_ITERS // 2, always_save_checkpoint=False)
    first = train(half, log=lambda line: None)
    assert first.iter_num == MAX_ITERS // 2
    messages = []
    rest = train(
        tiny(tmp_path, data_dir, init_from="resume", always_save_checkpoint=False),
        log=messages.append,
    )
    assert any("resuming from iter 10" in m for m in messages)
    assert rest.iter_num == MAX_ITERS
    resumed = {**first.losses, **rest.losses}
    assert sorted(resumed) == sorted(straight.losses)
    for step, loss in straight.losses.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    assert rest.evaluations[-1]["val_loss"] == pytest.approx(
        straight.evaluations[-1]["val_loss"], rel=1e-5
    )
    ours, theirs = nanogpt_jax.load(tmp_path), nanogpt_jax.load(straight_config.out_dir)
    assert params_dir(tmp_path) == tmp_path / "params"  # the best params, served by load
    assert ours.info["init_from"] == "scratch"  # where the run began, kept across resumes
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), ours.params, theirs.params)
    assert max(jax.tree.leaves(diffs)) < 1e-5
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [0, 10, 20]


def test_eval_only_and_refusing_to_overwrite_a_run(straight_run, tmp_path, data_dir):
    config, straight = straight_run
    out_dir = tmp_path / "copy"
    shutil.copytree(config.out_dir, out_dir)
    result = train(
        tiny(out_dir, data_dir, init_from="resume", eval_only=True), log=lambda line: None
    )
    assert [r["iter"] for r in result.evaluations] == [MAX_ITERS]
    assert result.evaluations[0]["val_loss"] == pytest.approx(
        straight.evaluations[-1]["val_loss"], rel=1e-5
    )
    with pytest.raises(UserError, match="already holds a training run"):
        train(tiny(out_dir, data_dir), log=lambda line: None)


def test_fine_tune_a_converted_checkpoint(char_checkpoint, tmp_path, data_dir):
    messages = []
    config = tiny(
        tmp_path,
        data_dir,
        init_from=str(char_checkpoint),
        block_size=16,  # cropped from the checkpoint's 32
        n_layer=4,  # the checkpoint's 2 layers win, with a note
        max_iters=4,
        eval_interval=2,
        dtype="bfloat16",  # compute in bfloat16, parameters and optimizer in float32
    )
    result = train(config, log=messages.append)
    assert any("model shape from" in m for m in messages)
    assert all(math.isfinite(loss) for loss in result.losses.values())
    bundle = nanogpt_jax.load(tmp_path)
    assert bundle.config.block_size == 16 and bundle.config.n_embd == 32
    assert bundle.params["wpe"]["embedding"].shape == (16, 32)
    assert bundle.params["wte"]["embedding"].dtype == jnp.float32
    assert bundle.info["init_from"] == str(char_checkpoint)


def test_fine_tune_from_nanogpt_weights_equals_from_their_conversion(
    char_checkpoint, nanogpt_char_run, tmp_path, data_dir
):
    """init_from a nanoGPT ckpt.pt (converted in memory) takes the very same steps."""
    run = nanogpt_char_run
    settings = dict(max_iters=3, eval_interval=3, dropout=0.0)
    runs = {
        name: train(tiny(tmp_path / name, data_dir, **source, **settings), log=lambda line: None)
        for name, source in [
            ("converted", dict(init_from=str(char_checkpoint))),
            ("nanogpt", dict(init_from=str(run.ckpt), meta=str(run.meta))),
        ]
    }
    converted, nanogpt = runs.values()
    assert nanogpt.losses == converted.losses
    assert nanogpt.evaluations[-1]["val_loss"] == converted.evaluations[-1]["val_loss"]


def test_fine_tune_gpt2_on_bpe_shakespeare(tmp_path):
    """configs/finetune_shakespeare.py on data from scripts/prepare_shakespeare.py, starting
    from a (tiny, random) Hugging Face GPT-2 directory as nanoGPT starts from gpt2-xl."""
    prepare_bpe_dataset(SHAKESPEARE.read_text(), tmp_path / "data")
    hf_gpt2().save_pretrained(tmp_path / "hf")
    argv = [
        "configs/finetune_shakespeare.py",
        f"--init_from={tmp_path / 'hf'}",
        f"--data_dir={tmp_path / 'data'}",
        f"--out_dir={tmp_path / 'out'}",
        "--block_size=32",
        "--gradient_accumulation_steps=2",
        "--max_iters=4",
        "--eval_interval=2",
        "--eval_iters=2",
    ]
    config = parse_flags(TrainConfig, argv, config_files=True)
    assert (config.learning_rate, config.decay_lr, config.batch_size) == (3e-5, False, 1)
    result = train(config, log=lambda line: None)
    assert [record["lr"] for record in result.evaluations] == pytest.approx([3e-5] * 3)
    assert all(math.isfinite(loss) for loss in result.losses.values())
    bundle = nanogpt_jax.load(tmp_path / "out")
    assert bundle.tokenizer.describe() == {"kind": "gpt2"} and bundle.config.block_size == 32
    text = bundle.generate(["ROMEO:"], max_new_tokens=5, temperature=0.0).texts[0]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")


def test_fine_tune_rejects_another_vocabulary(char_checkpoint, tmp_path):
    prepare_char_dataset("to be or not to be, " * 50, tmp_path / "data")
    config = tiny(tmp_path / "out", tmp_path / "data", init_from=str(char_checkpoint))
    with pytest.raises(UserError, match="tokenizer"):
        train(config, log=lambda line: None)


def test_learning_rate_follows_nanogpt():
    config = TrainConfig(learning_rate=6e-4, warmup_iters=2000, lr_decay_iters=600000)

    def get_lr(it):  # nanoGPT's train.py
        if it < config.warmup_iters:
            return config.learning_rate * (it + 1) / (config.warmup_iters + 1)
        if it > config.lr_decay_iters:
            return config.min_lr
        decay_ratio = (it - config.warmup_iters) / (config.lr_decay_iters - config.warmup_iters)
        coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
        return config.min_lr + coeff * (config.learning_rate - config.min_lr)

    lr_at = learning_rate_schedule(config)
    for it in (0, 1, 1999, 2000, 2001, 300000, 599999, 600000, 600001, 700000):
        assert float(lr_at(it)) == pytest.approx(get_lr(it), rel=1e-5), it
    constant = learning_rate_schedule(TrainConfig(decay_lr=False, learning_rate=1e-3))
    assert float(constant(12345)) == pytest.approx(1e-3)


def test_weight_decay_spares_biases_and_layernorms():
    config = GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8, bias=True)
    mask = decays(nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param)))
    assert mask["wte"]["embedding"] and mask["wpe"]["embedding"]
    assert mask["h"][0]["attn"]["c_attn"]["weight"] and mask["h"][0]["mlp"]["c_proj"]["weight"]
    assert not mask["h"][0]["attn"]["c_attn"]["bias"] and not mask["h"][0]["ln_1"]["scale"]
    assert not mask["ln_f"]["scale"] and not mask["ln_f"]["bias"]
    # with zero gradients only the decay moves parameters: matrices shrink, vectors stay
    optimizer = make_optimizer(TrainConfig(decay_lr=False, learning_rate=0.5, weight_decay=0.1))
    params = {"weight": jnp.ones((3, 2)), "bias": jnp.ones(3)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(optimizer.update)(zeros, optimizer.init(params), params)
    np.testing.assert_allclose(updates["weight"], -0.05 * params["weight"])
    np.testing.assert_array_equal(updates["bias"], 0.0)


TINY = GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def tiny_params():
    return params_of(GPT(TINY, rngs=nnx.Rngs(0)))


def first_step(config: GPTConfig):
    """(params, batch, key) -> (params, loss) after a fresh optimizer's first step."""
    optimizer = make_optimizer(TrainConfig(warmup_iters=0, learning_rate=1e-2))
    graphdef = nnx.split(abstract_model(config))[0]
    step = make_train_step(optimizer)

    def run(params, batch, key):
        params = jax.tree.map(jnp.array, params)  # the step donates its inputs
        new, _, metrics = step(graphdef, params, optimizer.init(params), batch, key)
        return new, float(metrics.loss)

    return run


def test_gradient_accumulation_equals_one_large_batch(tiny_params):
    tokens = np.random.default_rng(0).integers(0, 16, (8, 9)).astype(np.int32)

    def micro_batches(count):  # (8, T) rows as `count` micro-batches of 8 / count rows
        return tokens[:, :-1].reshape(count, -1, 8), tokens[:, 1:].reshape(count, -1, 8)

    step = first_step(TINY)
    one, loss_one = step(tiny_params, micro_batches(1), jax.random.key(0))
    two, loss_two = step(tiny_params, micro_batches(2), jax.random.key(0))
    assert loss_one == pytest.approx(loss_two, rel=1e-6)
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), one, two)
    assert max(jax.tree.leaves(diffs)) < 1e-6


def test_dropout_is_drawn_from_the_step_key(tiny_params):
    tokens = np.random.default_rng(0).integers(0, 16, (1, 4, 9)).astype(np.int32)
    batch = (tokens[..., :-1], tokens[..., 1:])
    step = first_step(TINY.replace(dropout=0.5))
    losses = [step(tiny_params, batch, jax.random.key(seed))[1] for seed in (0, 0, 1)]
    assert losses[0] == losses[1] != losses[2]


NANOGPT_SHAKESPEARE_CONFIG = """
# train a miniature character-level shakespeare model
# good for debugging and playing on macbooks and such

out_dir = 'out-shakespeare-char'
eval_interval = 250 # keep frequent because we'll overfit
eval_iters = 200
log_interval = 10 # don't print too too often

# we expect to overfit on this small dataset, so only save when val improves
always_save_checkpoint = False

wandb_log = False # override via command line if you like
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256 # context of up to 256 previous characters

# baby GPT model :)
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3 # with baby networks can afford to go a bit higher
max_iters = 5000
lr_decay_iters = 5000 # make equal to max_iters usually
min_lr = 1e-4 # learning_rate / 10 usually
beta2 = 0.99 # make a bit bigger because number of tokens per iter is small

warmup_iters = 100 # not super necessary potentially

# on macbook also add
# device = 'cpu'  # run on cpu only
# compile = False # do not torch compile the model
"""


def test_nanogpt_config_files_are_read_as_they_are(tmp_path):
    """nanoGPT's own config/train_shakespeare_char.py, verbatim, and its command-line flags."""
    path = tmp_path / "train_shakespeare_char.py"
    path.write_text(NANOGPT_SHAKESPEARE_CONFIG)
    argv = [str(path), "--device=cpu", "--compile=False", "--wandb_log=True"]
    config = parse_flags(TrainConfig, argv, config_files=True)
    ours = parse_flags(TrainConfig, ["configs/train_shakespeare_char.py"], config_files=True)
    assert (config.wandb_log, config.wandb_project, config.wandb_run_name) == (
        True,
        "shakespeare-char",
        "mini-gpt",
    )
    differing = {
        name
        for name in TrainConfig.__dataclass_fields__
        if getattr(config, name) != getattr(ours, name)
    }
    assert differing == {"wandb_log", "wandb_project", "wandb_run_name", "device", "compile"}


class FakeWandb:
    """Records what the training loop hands to the `wandb` module."""

    def __init__(self):
        self.init_kwargs, self.logged, self.finished = None, [], False

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return self

    def log(self, values):
        self.logged.append(values)

    def finish(self):
        self.finished = True


def test_wandb_log_reports_every_evaluation(tmp_path, data_dir, monkeypatch):
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    names = dict(wandb_project="shakespeare-char", wandb_run_name="mini-gpt")
    config = tiny(tmp_path, data_dir, max_iters=10, eval_interval=5, wandb_log=True, **names)
    result = train(config, log=lambda line: None)
    assert wandb.init_kwargs["project"] == "shakespeare-char"
    assert wandb.init_kwargs["name"] == "mini-gpt"
    assert wandb.init_kwargs["config"]["max_iters"] == 10
    assert [values["iter"] for values in wandb.logged] == [0, 5, 10]
    for values, record in zip(wandb.logged, result.evaluations, strict=True):
        assert values["val/loss"] == record["val_loss"]
        assert values["train/loss"] == record["train_loss"] and values["lr"] == record["lr"]
    assert wandb.finished


def test_wandb_log_without_wandb_is_one_error(tmp_path, data_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(UserError, match="pip install wandb"):
        train(tiny(tmp_path / "run", data_dir, wandb_log=True), log=lambda line: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "config_text, fragments",
    [
        ("learning_rate = 1e-3\nn_heads = 4\n", ["unknown setting", "n_heads"]),
        ("batch_size = int('12')\n", ["not a literal", "batch_size"]),
        ("batch_size = '12'\n", ["batch_size", "expected int"]),
        ("import os\n", ["only `name = value`"]),
    ],
    ids=["unknown-key", "non-literal", "wrong-type", "statement"],
)
def test_config_file_errors(tmp_path, config_text, fragments):
    path = tmp_path / "config.py"
    path.write_text(config_text)
    with pytest.raises(UserError) as error:
        train_main([str(path)])
    for fragment in fragments:
        assert fragment in str(error.value)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--nope=1"], "--nope"),
        (["--dtype=float16"], "loss scaling"),
        (["--lr_decay_iters=10", "--warmup_iters=100"], "lr_decay_iters"),
        (["--block_size=0"], "block_size"),
    ],
)
def test_bad_flags(argv, fragment):
    with pytest.raises(UserError, match=fragment):
        train_main(argv)


def test_cli_errors_are_one_line(tmp_path, data_dir):
    config = tmp_path / "bad.py"
    config.write_text("n_layer = 4\nn_heads = 4\n")
    assert_one_line_error(run_script("train", str(config)), "n_heads")
    missing = run_script("train", f"--data_dir={tmp_path / 'none'}", f"--out_dir={tmp_path}")
    assert_one_line_error(missing, "none", "does not exist")


def test_resume_from_a_corrupt_checkpoint_is_one_error_line(straight_run, tmp_path, data_dir):
    config, _ = straight_run
    out_dir = tmp_path / "run"
    shutil.copytree(config.out_dir, out_dir)
    for path in (out_dir / "checkpoints" / str(MAX_ITERS) / "opt_state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage")
    result = run_script(
        "train",
        "configs/train_shakespeare_char.py",
        "--init_from=resume",
        f"--out_dir={out_dir}",
        f"--data_dir={data_dir}",
        "--block_size=32",
        "--device=cpu",
    )
    assert_one_line_error(result, "damaged checkpoint", "opt_state")
    (out_dir / "checkpoints" / str(MAX_ITERS) / "sha256sums.json").unlink()
    with pytest.raises(UserError, match="cannot resume from this checkpoint"):
        train(tiny(out_dir, data_dir, init_from="resume"), log=lambda line: None)
    with pytest.raises(UserError, match="no checkpoint to resume"):
        train(tiny(tmp_path / "empty", data_dir, init_from="resume"), log=lambda line: None)

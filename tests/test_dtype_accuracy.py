"""scripts/dtype_accuracy.py: bfloat16 against float32 on the built-in model's real weights."""

from conftest import assert_one_line_error, run_script

import nanogpt_jax
from nanogpt_jax.commands.dtype_accuracy import compare


def test_a_dtype_against_itself_agrees_everywhere():
    bundle = nanogpt_jax.load("shakespeare-char")
    prompts = [bundle.tokenizer.encode(text) for text in ("ROMEO:\nWhat", "KING:\nNow, ")]
    report = compare(bundle, bundle, prompts, 24)
    assert report["shared_steps_min"] == 24
    assert report["argmax_agree"] == 1.0
    assert report["max_rel_logit_err"] == 0.0


def test_bfloat16_on_the_builtin_model_reports_its_distance_from_float32():
    result = run_script("dtype_accuracy", "--prompts=2", "--prompt_len=12", "--new_tokens=16")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("shakespeare-char: bfloat16 against float32")
    assert len(lines) == 5  # title, header, two prompts, all
    _, shared, agree, error = lines[-1].split()
    assert 0 <= int(shared) <= 16
    # bfloat16 keeps 8 bits of mantissa: logits move by ~1e-2 of their scale, not 0, not 1
    assert 1e-4 < float(error) < 0.2
    assert 0.8 <= float(agree) <= 1.0


def test_float32_is_not_a_dtype_to_compare():
    assert_one_line_error(run_script("dtype_accuracy", "--dtype=float32"), "dtype")

"""nanoGPT-style command lines: `[config files] --key=value ...`, parsed, never executed.

A command declares its flags as a dataclass; every value is type-checked against the field's
annotation. Values are Python literals (`--top_k=None`, `--bias=False`, `--temperature=0.8`);
string flags also take bare words (`--out_dir=out-shakespeare-char`). Config files hold
`name = literal` assignments (arithmetic on numbers allowed: `max_iters = 5 * 1000`) and
comments, nothing else. A boolean flag given bare (`--force`) is set to True.
"""

from __future__ import annotations

import ast
import dataclasses
import operator
import sys
from pathlib import Path
from typing import Any

from nanogpt_jax.config import checked_fields
from nanogpt_jax.errors import UserError


def flag(default, help: str):
    """A dataclass field for a flag, with the line `--help` prints beside it."""
    return dataclasses.field(default=default, metadata={"help": help})


_ARITHMETIC = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: operator.pow,
}


def parse_flags(flags_class, argv: list[str], *, config_files: bool = False, usage: str = ""):
    """An instance of dataclass `flags_class` from config files and `--key=value` arguments.

    `--help` prints the flags with their defaults and exits.
    """
    # a field `from_` is the flag --from (a Python keyword)
    fields = {f.name.rstrip("_"): f for f in dataclasses.fields(flags_class)}
    values: dict[str, Any] = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print_help(flags_class, usage)
            sys.exit(0)
        if arg.startswith("--"):
            key, sep, raw = arg[2:].partition("=")
            if key not in fields:
                raise UserError(f"unknown flag --{key} (see --help for the flags)")
            if not sep:
                if fields[key].type not in ("bool", bool):
                    raise UserError(f"flag {arg} needs a value: write --{key}=VALUE")
                raw = "True"
            values[fields[key].name] = parse_value(raw, fields[key].type)
        elif config_files:
            for key, value in read_config_file(arg).items():
                if key not in fields:
                    raise UserError(f"{arg}: unknown setting {key!r} (see --help for the flags)")
                values[fields[key].name] = value
        else:
            raise UserError(f"unexpected argument {arg!r}: flags are written --key=value")
    return flags_class(**checked_fields(flags_class, values, what="flag"))


def parse_value(raw: str, annotation) -> Any:
    """A literal if the text is one; for string flags, otherwise the text itself."""
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = raw
    wants_str = "str" in str(annotation)
    if wants_str and not isinstance(value, str) and not (value is None and "None" in annotation):
        return raw
    return value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """`name = literal` assignments of a config file, evaluated without executing it."""
    path = Path(path)
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except FileNotFoundError:
        raise UserError(f"{path}: no such config file") from None
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: not valid Python syntax") from None
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if not (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        ):
            raise UserError(f"{path}:{node.lineno}: only `name = value` assignments are allowed")
        try:
            values[node.targets[0].id] = literal(node.value)
        except ValueError:
            raise UserError(
                f"{path}:{node.lineno}: the value of {node.targets[0].id} is not a literal"
            ) from None
    return values


def literal(node: ast.AST) -> Any:
    """ast.literal_eval, plus arithmetic between numbers."""
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        left, right = literal(node.left), literal(node.right)
        if all(isinstance(x, int | float) and not isinstance(x, bool) for x in (left, right)):
            return _ARITHMETIC[type(node.op)](left, right)
        raise ValueError("arithmetic on non-numbers")
    return ast.literal_eval(node)


def print_help(flags_class, usage: str) -> None:
    if usage:
        print(usage)
    print("flags (--key=value):")
    for field in dataclasses.fields(flags_class):
        default = field.default if field.default is not dataclasses.MISSING else "(required)"
        note = field.metadata.get("help", "")
        print(f"  --{field.name.rstrip('_')}={default!r}  {note}".rstrip())


def number_list(name: str, text: str, kind=int, blanks: bool = False) -> tuple:
    """A comma-list flag's positive numbers (`kind` int or float). blanks: empty items are
    skipped, and so the list may be empty."""
    what = "integers" if kind is int else "numbers"
    message = f"--{name} must be positive {what}, comma-separated: {text!r}"
    parts = [part for part in text.split(",") if part.strip() or not blanks]
    try:
        values = tuple(kind(part) for part in parts)
    except ValueError:
        raise UserError(message) from None
    if (not values and not blanks) or any(v <= 0 for v in values):
        raise UserError(message)
    return values

"""The package's shape: imports run one way, from the wings down into the core, without a
circle, and sampling from the built-in model imports no PyTorch, plotting or wing module."""

import ast
import json
import subprocess
import sys

from conftest import REPO

PACKAGE = REPO / "nanogpt_jax"
WINGS = ("training", "bench", "interop", "serve", "commands")
HEAVY = (
    "torch",
    "transformers",
    "safetensors",
    "matplotlib",
    "huggingface_hub",
    "fastapi",
    "uvicorn",
)
# The one place the core reaches into a wing, inside the function that needs it: load() given
# PyTorch weights converts them, and only then imports the converter (and torch with it).
CORE_TO_WING_AT_CALL_TIME = {("nanogpt_jax.bundle", "nanogpt_jax.interop.convert")}


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking_block(node) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")


def imported_modules(node, package: str) -> set[str]:
    """nanogpt_jax modules an import statement names (`from nanogpt_jax.x import y` counts
    `nanogpt_jax.x.y` when y is a module itself)."""
    names = set()
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
        names = {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in names if name.split(".")[0] == "nanogpt_jax"}


def import_graph():
    """(module-level imports, imports inside functions), each {module: {imported modules}}."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    at_import, at_call = {}, {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        top, inner = set(), set()
        statements = [n for n in tree.body if not is_type_checking_block(n)]
        functions = [
            n
            for s in statements
            for n in ast.walk(s)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        ]
        in_functions = {id(n) for f in functions for n in ast.walk(f)}
        for statement in statements:
            for node in ast.walk(statement):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    called = id(node) in in_functions
                    (inner if called else top).update(imported_modules(node, package))
        at_import[name] = {m for m in top if m in modules and m != name}
        at_call[name] = {m for m in inner if m in modules and m != name} - at_import[name]
    return at_import, at_call


def is_core(module: str) -> bool:
    return module.split(".")[1] not in WINGS if "." in module else True


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The modules that import each other, directly or through others, grouped."""
    reach = {node: reachable(graph, node) for node in graph}
    groups = {frozenset(n for n in reach[a] if a in reach[n]) for a in graph if a in reach[a]}
    return sorted((set(g) for g in groups), key=sorted)


def test_module_level_imports_have_no_circle():
    at_import, _ = import_graph()
    assert len(at_import) > 30  # the scan saw the package
    assert circles(at_import) == []


def test_the_only_circle_is_bundle_generate_delegating():
    """`bundle.generate(...)` imports `generate` when called, and `generate` reads the bundle:
    that pair may know each other; the engine, below both, must not import the bundle."""
    at_import, at_call = import_graph()
    both = {m: at_import[m] | at_call[m] for m in at_import}
    assert circles(both) == [{"nanogpt_jax.bundle", "nanogpt_jax.generate"}]


def test_the_core_imports_no_wing():
    at_import, at_call = import_graph()
    for module, imports in at_import.items():
        if is_core(module):
            wings = sorted(m for m in imports if not is_core(m))
            assert not wings, f"{module} imports {wings}"
    reaching = {(m, i) for m, imports in at_call.items() if is_core(m) for i in imports}
    assert {(m, i) for m, i in reaching if not is_core(i)} == CORE_TO_WING_AT_CALL_TIME


def test_circles_are_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_sampling_the_builtin_model_imports_no_torch_plotting_or_wing():
    code = """
import json, sys
import nanogpt_jax
bundle = nanogpt_jax.load("shakespeare-char")
text = bundle.generate("ROMEO:", max_new_tokens=8, seed=1).texts[0]
print(json.dumps({"text": text, "modules": sorted(sys.modules)}))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["text"].startswith("ROMEO:") and len(report["text"]) == len("ROMEO:") + 8
    modules = report["modules"]
    assert "nanogpt_jax.generate" in modules and "jax" in modules  # the probe saw imports
    heavy = [m for m in modules if m.split(".")[0] in HEAVY]
    wings = [m for m in modules if m.startswith("nanogpt_jax.") and not is_core(m)]
    assert heavy == [] and wings == [], (heavy, wings)

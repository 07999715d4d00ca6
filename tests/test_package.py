"""The package's shape: imports run one way (no cycle), short signatures, one accuracy and one ridge solve."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "crossdistill"
MAX_PARAMS = 6


def _modules() -> dict[str, ast.Module]:
    """Dotted module name -> parsed source, for every .py file of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Package modules that ``name`` imports anywhere in its source (top level, in functions, TYPE_CHECKING)."""
    package = name if _is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from . import x` / `from .pkg import mod` import submodules, not just names
            targets = [target] + [f"{target}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_package_imports_have_no_cycle() -> None:
    modules = _modules()
    graph = {name: _imports(name, tree, set(modules)) for name, tree in modules.items()}
    assert "crossdistill.run" in graph["crossdistill.compress"]  # the walk sees relative imports
    assert "crossdistill.run" in graph["crossdistill.baselines.common"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_imports_run_one_way_through_the_pipeline() -> None:
    """cli -> methods -> {compress, baselines} -> run -> {plan, solvers, capture, measure, pruning}."""
    modules = _modules()
    graph = {name: _imports(name, tree, set(modules)) for name, tree in modules.items()}

    def reaches(src: str) -> set[str]:
        seen, todo = set(), [src]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    low = {f"crossdistill.{m}" for m in ("plan", "solvers", "capture", "measure", "pruning", "config")}
    upper = {"crossdistill.cli", "crossdistill.methods", "crossdistill.compress", "crossdistill.baselines"}
    assert not reaches("crossdistill.run") & (upper | {"crossdistill.run"})
    for m in low:
        assert not reaches(m) & (upper | {"crossdistill.run"}), m
    assert "crossdistill.methods" not in reaches("crossdistill.compress") | reaches("crossdistill.baselines")


def _param_count(fn: ast.FunctionDef | ast.AsyncFunctionDef, is_method: bool) -> int:
    args = fn.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    if is_method and names and names[0] in ("self", "cls"):
        names = names[1:]
    return len(names)  # *args / **kwargs not counted


def _is_cli_command(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A typer command: decorated with ``@app.command(...)``."""
    for d in fn.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if isinstance(target, ast.Attribute) and target.attr == "command":
            return True
    return False


def _walk(module: str, node: ast.AST, prefix: str, in_class: bool):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield module, f"{prefix}{child.name}", child, in_class
            yield from _walk(module, child, f"{prefix}{child.name}.", False)
        elif isinstance(child, ast.ClassDef):
            yield from _walk(module, child, f"{prefix}{child.name}.", True)
        else:
            yield from _walk(module, child, prefix, in_class)


def _functions():
    """(module, qualified name, node, is_method) for every function of the package."""
    for name, tree in _modules().items():
        yield from _walk(name, tree, "", False)


def test_the_parameter_counter_counts_what_it_should() -> None:
    tree = ast.parse("class A:\n    def f(self, a, b=1, *c, d, **e): pass\ndef g(a, /, b): pass\n")
    (cls, g) = tree.body
    assert _param_count(cls.body[0], is_method=True) == 3
    assert _param_count(g, is_method=False) == 2


def test_no_function_takes_more_than_six_parameters_except_cli_commands() -> None:
    long = [
        f"{module}.{qual} ({_param_count(fn, is_method)})"
        for module, qual, fn, is_method in _functions()
        if _param_count(fn, is_method) > MAX_PARAMS and not _is_cli_command(fn)
    ]
    assert not long, f"functions with more than {MAX_PARAMS} parameters: {', '.join(long)}"
    commands = [q for m, q, fn, _ in _functions() if m == "crossdistill.cli" and _is_cli_command(fn)]
    assert {"compress", "evaluate", "demo"} <= set(commands)  # the exception is exactly the typer commands


def test_one_accuracy_function_and_one_ridge_solve() -> None:
    accuracy = [f"{m}.{q}" for m, q, _, _ in _functions() if q.rpartition(".")[2] == "accuracy"]
    assert accuracy == ["crossdistill.evaluate.accuracy"]
    # every closed-form ridge fit goes through solvers.ridge_solve: the only Cholesky in the package
    cholesky = [
        m
        for m, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in ("cholesky_ex", "cholesky", "cholesky_solve")
    ]
    assert cholesky == ["crossdistill.solvers", "crossdistill.solvers"]  # cholesky_ex + cholesky_solve, once each
    assert [q for m, q, _, _ in _functions() if q == "ridge_solve"] == ["ridge_solve"]

"""The package's shape: no import cycles, one registry per component kind, every method in a module of its own."""
import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dat_ds"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path, inside_functions: bool = False) -> set:
    """Modules of dat_ds that ``path`` imports when it is imported (with ``inside_functions``: also
    the imports inside its functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree) if inside_functions else tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dat_ds")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if not base.startswith("dat_ds"):
                continue
            for alias in node.names:  # `from . import x` imports the submodule x
                candidate = f"{base}.{alias.name}"
                found.add(candidate if _exists(candidate) else base)
    return {m for m in found if m != name}


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def import_graph() -> dict:
    return {module_name(p): top_level_imports(p) for p in PACKAGE.rglob("*.py")}


def find_cycle(graph: dict):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_inside_dat_ds():
    graph = import_graph()
    assert "dat_ds.attacks.pgd" in graph and graph["dat_ds.smoothing"], "the graph was not read"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_import_cycle_even_through_imports_inside_functions():
    """A lazy import is still a circle (e.g. the QSGD codec and its baseline share the payload layout
    from a module below both)."""
    graph = {module_name(p): top_level_imports(p, inside_functions=True) for p in PACKAGE.rglob("*.py")}
    assert "dat_ds.compress.bits" in graph["dat_ds.compress.baseline"], "the graph was not read"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_engine_and_checkpoints_do_not_import_each_other_even_inside_functions():
    """A lazy import is still a circle: ConfigError lives below both, and stays importable from the engine."""
    graph = {module_name(p): top_level_imports(p, inside_functions=True) for p in PACKAGE.rglob("*.py")}
    assert "dat_ds.engine" in graph["dat_ds.trainer.state"], "the graph was not read"
    assert "dat_ds.engine" not in graph["dat_ds.checkpoint"] and "dat_ds.checkpoint" in graph["dat_ds.engine"]
    from dat_ds.engine import ConfigError
    from dat_ds.errors import ConfigError as Shared
    assert ConfigError is Shared and issubclass(ConfigError, ValueError)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module, names", [
    ("pgd", ["pgd", "pgd_l2"]), ("fgsm", ["fgsm_rs"]), ("free", ["free"]), ("conadv", ["conadv"]),
    ("smooth", ["smooth_pgd_l2"]), ("noise", ["none", "noise"])])
def test_each_attack_lives_in_the_module_named_after_it(module, names):
    from dat_ds import attacks
    for name in names:
        assert attacks.ATTACKS.get(name).__module__ == f"dat_ds.attacks.{module}"


def test_every_objective_exists_whatever_was_imported_first():
    import subprocess
    import sys
    code = "import dat_ds.objectives as o; print(','.join(o.names()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out.split(",") == ["madry", "mix", "smooth", "trades"]


def test_step_shapes_are_declared_not_named():
    from dat_ds import attacks
    shapes = {name: type(attacks.ATTACKS.get(name).shape).__name__ for name in attacks.names()}
    assert shapes["free"] == "Replay" and shapes["conadv"] == "LookAhead"
    assert {s for n, s in shapes.items() if n not in ("free", "conadv")} == {"Plain"}
    trainer_code = "".join(p.read_text() for p in (PACKAGE / "trainer").glob("*.py"))
    assert not re.search(r"attack\s*(==|!=|in)\s*[\"'(]", trainer_code)  # no step chosen by the attack's name
    assert "getattr(attack" not in trainer_code and "stale_weights" not in trainer_code

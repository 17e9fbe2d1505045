"""The package's shape: no import cycles (function-level imports included), no function over
80 lines, and no family-name comparison outside the family registry and specs."""

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "jaxlm"
FAMILY_TEST = re.compile(r"""(\bfamily|\.family)\s*(==|!=|\bin\b|\bnot in\b)"""
                         r"""|["'](decoder|encoder|encoder_decoder)["']\s*(==|!=)""")


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = (".".join(package[:len(package) - node.level + 1]) if node.level else "")
            target = ".".join(p for p in (base, node.module or "") if p)
            out.add(target)
            out |= {f"{target}.{a.name}" for a in node.names}
    return {m for m in out if m in mods and m != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle between modules of different packages, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                loop = stack[stack.index(n):]
                # A package importing its own submodules through __init__ is no cycle.
                if not all(x.startswith(loop[0]) for x in loop):
                    return loop + [n]
            elif n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a.x": {"a.y"}, "a.y": {"b.z"}, "b.z": {"a.x"}}) == [
        "a.x", "a.y", "b.z", "a.x"]
    assert _cycle({"a": {"a.x"}, "a.x": {"a"}}) is None


def test_no_function_over_80_lines():
    long = [f"{p.name}:{n.lineno} {n.name}" for p in PKG.rglob("*.py")
            for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 80]
    assert not long


def test_family_names_are_compared_only_in_the_family_registry_and_specs():
    found = [f"{p.relative_to(PKG)}:{i}" for p in PKG.rglob("*.py")
             if not re.search(r"famil|registry|spec", p.name)
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if FAMILY_TEST.search(line) and not line.lstrip().startswith("#")]
    assert not found

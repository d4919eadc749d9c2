"""The house rules that a reader relies on: engines/ has no import cycle (deferred imports included,
since a cycle hidden in a function is still a cycle), importing `engines` stays light, and memory has one
unit with one constant (GiB, `engines.protocol.GIB`) that every name carrying it says (`*_gib`)."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """engines module -> the engines modules it imports anywhere in its body."""
    modules = {module_name(path): path for path in (ROOT / "engines").rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from engines.models import catalog` names a submodule; `from engines.x import f` the module.
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                           for alias in node.names]
            graph[name] |= {target for target in targets if target in modules and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_constructed_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_of_engines_imports_another_in_a_circle():
    graph = import_graph()
    assert len(graph) > 30
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_importing_engines_does_not_import_torch_cuda_vllm_or_bitsandbytes():
    code = ("import sys, engines, engines.registry; engines.registry.list_engines(); "
            "print(sorted(m for m in ('torch', 'vllm', 'bitsandbytes', 'llama_cpp') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def source_files() -> list[Path]:
    return [path for folder in ("engines", "app", "scripts") for path in (ROOT / folder).rglob("*.py")]


def test_one_gib_constant_and_every_gib_name_says_gib():
    definitions = [(str(path.relative_to(ROOT)), line) for path in source_files()
                   for line in path.read_text().splitlines() if "1024 ** 3" in line]
    assert [(path, line.split("=")[0].strip()) for path, line in definitions] == [("engines/protocol.py", "GIB")]
    # `survey_gb` holds the survey's own figures, in the GB it printed; every other memory figure is GiB.
    misnamed = sorted({name for path in source_files()
                       for name in re.findall(r"\b\w+_gb\b", path.read_text()) if name != "survey_gb"})
    assert misnamed == [], misnamed

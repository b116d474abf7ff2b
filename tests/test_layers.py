"""One-way layers: every import in fxprune/ and passes/ points to its own layer or below,
and no module imports a private (``_name``) helper of another layer.

Layers, bottom up (passes/README.md draws them):
0 core types, 1 op rules, 2 passes, 3 planning, 4 API and CLI.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CORE, RULES, PASSES, PLANNING, API = range(5)
NAMES = ["core", "op rules", "passes", "planning", "API/CLI"]
# module (or package prefix) -> layer; the longest matching prefix wins
LAYERS = {
    "fxprune.core": CORE,
    "passes.units": RULES, "passes.rules": RULES,
    "passes": PASSES,
    "fxprune.planning": PLANNING,
    "fxprune": API,
}


def layer_of(module: str) -> int | None:
    best = None
    for prefix, layer in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return None if best is None else best[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> list[Path]:
    return sorted(p for d in ("fxprune", "passes") for p in (ROOT / d).rglob("*.py"))


def imports_of(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) for every import, lazy ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module, [a.name for a in node.names]))
    return out


def test_every_project_module_has_a_layer():
    missing = [module_name(p) for p in project_modules() if layer_of(module_name(p)) is None]
    assert not missing, f"add these modules to LAYERS: {missing}"


def test_imports_point_down_and_read_no_private_name_of_another_layer():
    bad = []
    for path in project_modules():
        me = module_name(path)
        mine = layer_of(me)
        for line, target, names in imports_of(path):
            theirs = layer_of(target)
            if theirs is None:
                continue  # torch, numpy...
            where = f"{path.relative_to(ROOT)}:{line} ({NAMES[mine]}) imports {target}"
            if theirs > mine:
                bad.append(f"{where} ({NAMES[theirs]}): upward")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and theirs != mine:
                bad.append(f"{where}: private {private}")
    assert not bad, "\n".join(bad)


def test_layer_checker_sees_an_upward_import(tmp_path):
    """The checker itself can fail: a core module importing a pass is reported."""
    assert layer_of("passes.find_groups") > layer_of("fxprune.core.groups")
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n    from passes.find_groups import _x\n")
    assert imports_of(fake) == [(2, "passes.find_groups", ["_x"])]


def test_core_and_planning_imports_load_no_pass():
    """Importing core and planning modules (one fresh interpreter) loads no pass."""
    modules = "fxprune.errors, fxprune.groups, fxprune.plan, fxprune.pipeline, " \
        "fxprune.report, fxprune.importance, fxprune.planner"
    code = (f"import sys, {modules}; "
            "bad = sorted(m for m in sys.modules if m == 'passes' or m.startswith('passes.')); "
            "print(bad); sys.exit(1 if bad else 0)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert run.returncode == 0, run.stdout + run.stderr

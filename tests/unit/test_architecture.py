"""The import rules of ARCHITECTURE.md, read from the code itself (ast), so that a rule is not a wish.

core      imports nothing of ours but core
host      core
build, guest, report, cache (the stages)
          core, host, themselves, and the shared protocol modules of another stage (PROTOCOL)
flow      core, host, the stages (composition: the only place where stages meet)
bench     anything but cli;   cli: anything
Only kernel_ci/core/proc.py imports subprocess; no module imports another in a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "kernel_ci"
STAGES = {"build", "guest", "report", "cache"}
# The records and formats that stages hand each other: typed, JSON round-trip, importing core only.
PROTOCOL = {
    "kernel_ci.build.records",
    "kernel_ci.build.keys",  # the key format: inputs -> key, input diffs (the service's miss explanation)
    "kernel_ci.build.layout",  # the output directory / cache entry layout, its honest symlinks
    "kernel_ci.guest.suites",  # the suite manifest format: the build reads each suite's kconfig needs
    "kernel_ci.guest.protocol",
    "kernel_ci.report.junit",
    "kernel_ci.report.model",
}
ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "host": {"core", "host"},
    "flow": {"core", "host", "flow", *STAGES},
    "bench": {"core", "host", "flow", "bench", *STAGES},
    "cli": {"core", "host", "flow", "bench", "cli", *STAGES},
}
SUBPROCESS_OWNER = "kernel_ci.core.proc"
# Violations left from the flat layout, each being removed by the redesign (issue 13). A listed one that is
# gone fails the test too, so this list only shrinks; it must end empty.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()
KNOWN_CYCLES: set[frozenset[str]] = set()


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.is_relative_to(PACKAGE / "data"):  # package data: guest code (kci-runner), not host modules
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str:
    """`kernel_ci.build` + `from ... import source` -> the module actually imported."""
    return name if name in MODULES else name.rsplit(".", 1)[0]


def imports_of(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from pkg import module` imports the module, not the package
                sub = f"{node.module}.{alias.name}"
                names.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{module}: relative import; write the absolute module name")
    return {_resolve(n) for n in names if n == "kernel_ci" or n.startswith("kernel_ci.")} | {
        n for n in names if n.split(".")[0] in {"subprocess"}
    }


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(module: str) -> list[tuple[str, str]]:
    mine = layer(module)
    found = []
    for target in sorted(imports_of(module)):
        if target == "subprocess":
            if module != SUBPROCESS_OWNER:
                found.append((module, target))
            continue
        theirs = layer(target)
        if not theirs or theirs == mine:
            continue
        allowed = {"core", "host"} if mine in STAGES else ALLOWED[mine]
        if theirs not in allowed and not (mine in STAGES and target in PROTOCOL):
            found.append((module, target))
    return found


def _explain(module: str, target: str) -> str:
    if target == "subprocess":
        return f"{module} imports subprocess: run commands through core.proc"
    return f"{module} may not import {target} (see ARCHITECTURE.md, import rules)"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m)))
def test_module_imports_follow_the_layer_rules(module: str) -> None:
    for found in violations(module):
        assert found in KNOWN_VIOLATIONS, _explain(*found)


def test_known_violations_are_still_there() -> None:
    """A fixed violation leaves the list: the list only shrinks."""
    present = {v for m in MODULES for v in violations(m)}
    assert not KNOWN_VIOLATIONS - present, (
        f"fixed, remove from KNOWN_VIOLATIONS: {KNOWN_VIOLATIONS - present}"
    )


@pytest.mark.parametrize("module", sorted(PROTOCOL & set(MODULES)))
def test_protocol_modules_import_core_only(module: str) -> None:
    for target in imports_of(module):
        assert target == "subprocess" or layer(target) == "core" or target in PROTOCOL, (
            f"{module} is shared between stages and may import core only, not {target}"
        )


def test_no_import_cycles() -> None:
    graph = {m: {t for t in imports_of(m) if t in MODULES and t != m} for m in MODULES}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
                if frozenset(cycle) not in KNOWN_CYCLES:
                    raise AssertionError("import cycle: " + " -> ".join(cycle))
                continue
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_rules_catch_a_violation(tmp_path: Path) -> None:
    """The checker itself: a core module importing a stage is caught."""
    global MODULES
    saved = MODULES
    fake = tmp_path / "kernel_ci" / "core" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from kernel_ci.build import source\n")
    MODULES = {**saved, "kernel_ci.core.bad": fake, "kernel_ci.build.source": saved["kernel_ci.build.source"]}
    try:
        assert violations("kernel_ci.core.bad") == [("kernel_ci.core.bad", "kernel_ci.build.source")]
        with pytest.raises(AssertionError, match=r"may not import kernel_ci\.build\.source"):
            test_module_imports_follow_the_layer_rules("kernel_ci.core.bad")
    finally:
        MODULES = saved

"""The house rules that keep the code base easy to change, checked on the source itself (ast, not grep):
no module reaches another module's private name, no test imports another test module, the ground floor
(io/, imaging/) holds no stage, and ARCHITECTURE.md's module map names exactly the modules that exist."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "unparrot"
STAGES = ("ops", "engine", "curate", "synth", "evaluate", "train", "rewrite", "demo", "cli", "report", "profile")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_of(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(own: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute module that an ImportFrom inside module `own` names."""
    if node.level == 0:
        return node.module or ""
    pkg = own.split(".")
    if not is_pkg:
        pkg = pkg[:-1]
    base = pkg[: len(pkg) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_module(dotted: str) -> bool:
    p = SRC.parent.joinpath(*dotted.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def private_reaches(path: Path, own: str | None = None) -> list[str]:
    """`from X import _y` and `mod._y` where X / mod is another unparrot module. `own` is the module's
    dotted name (default: from its place under src/; tests and benchmarks have none)."""
    tree = ast.parse(path.read_text(), str(path))
    if own is None:
        own = _module_of(path) if path.is_relative_to(SRC) else ""
    bad, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = _resolve(own, path.name == "__init__.py", node) if own else (node.module or "")
            if not mod.startswith("unparrot") or mod == own:
                continue
            for a in node.names:
                if _private(a.name):
                    bad.append(f"{path.name}:{node.lineno} imports {mod}.{a.name}")
                elif _is_module(f"{mod}.{a.name}"):
                    modules.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("unparrot") and a.asname:
                    modules.add(a.asname)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and _private(node.attr)
        ):
            bad.append(f"{path.name}:{node.lineno} reaches {node.value.id}.{node.attr}")
    return bad


def test_no_module_imports_another_modules_private_name():
    files = (
        sorted(SRC.rglob("*.py")) + sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    )
    bad = [b for f in files for b in private_reaches(f)]
    assert not bad, "private names reached across modules:\n" + "\n".join(bad)


def test_the_private_name_check_can_fail(tmp_path):
    # the checker itself, on a module that does reach private names (so the rule above is not vacuous)
    f = tmp_path / "probe.py"
    f.write_text("from .local import _init_worker\nfrom .. import pool\nx = pool._anything\n")
    bad = private_reaches(f, own="unparrot.engine.probe")
    assert len(bad) == 2 and "unparrot.engine.local._init_worker" in bad[0] and "pool._anything" in bad[1]


def test_no_test_imports_another_test_module():
    # shared test code lives in the support module tests/helpers.py (test doubles, builders, asserts);
    # a test module (test_*.py) or conftest.py (pytest's plugin: fixtures only) is never imported
    tests = ROOT / "tests"
    local = {p.stem for p in tests.glob("test_*.py")} | {"conftest"}
    bad = []
    for f in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            bad += [f"{f.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in local]
    assert not bad, "tests importing test modules (use conftest fixtures):\n" + "\n".join(bad)


def _stage_imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = _resolve(_module_of(path), path.name == "__init__.py", node)
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            parts = t.split(".")
            if parts[0] == "unparrot" and len(parts) > 1 and parts[1] in STAGES:
                out.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {t}")
                break
    return out


def test_ground_floor_holds_no_stage():
    floor = [p for d in ("io", "imaging") if (SRC / d).exists() for p in sorted((SRC / d).rglob("*.py"))]
    assert floor
    bad = [b for f in floor for b in _stage_imports(f)]
    assert not bad, "the ground floor imports a stage:\n" + "\n".join(bad)


def _modules() -> set[str]:
    """Every module and subpackage under src/unparrot, as paths relative to it (`engine/stage.py`, `io/`)."""
    out = set()
    for p in SRC.rglob("*.py"):
        rel = p.relative_to(SRC)
        if "__pycache__" in rel.parts or rel.name in ("__init__.py", "__main__.py"):
            continue
        out.add(rel.as_posix())
    out |= {p.relative_to(SRC).as_posix() + "/" for p in SRC.iterdir() if (p / "__init__.py").exists()}
    return out


def test_architecture_md_matches_the_tree():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    assert len(text.splitlines()) <= 40, "ARCHITECTURE.md is a short module map (<= 40 lines)"
    named = set(re.findall(r"`([a-z_/]+(?:\.py|/))`", text))
    # a module named as `pkg/a.py` or, within a package's line, by its bare file name `a.py`
    flat = {n for n in named if "/" not in n}
    tree = _modules()
    missing = sorted(m for m in tree if m not in named and m.split("/")[-1] not in flat)
    stale = sorted(n for n in named if n not in tree and not any(m.endswith("/" + n) or m == n for m in tree))
    assert not missing, f"modules missing from ARCHITECTURE.md: {missing}"
    assert not stale, f"ARCHITECTURE.md names modules that do not exist: {stale}"


def test_top_level_exports_load_lazily():
    import subprocess
    import sys

    code = (
        "import sys, unparrot\n"
        "heavy = ('unparrot.engine', 'unparrot.curate.select', 'unparrot.evaluate.audit')\n"
        "lazy = [m for m in heavy if m in sys.modules]\n"
        "import unparrot.ingest, unparrot.synth.generate\n"
        "from unparrot import ingest, synth\n"
        "print(lazy, callable(ingest) and ingest.__module__, callable(synth) and synth.__module__)\n"
        "for n in unparrot.EXPORTS: assert getattr(unparrot, n).__name__ == n, n\n"
        "assert set(unparrot.EXPORTS) <= set(dir(unparrot))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "unparrot.ingest", "unparrot.synth.generate"], out

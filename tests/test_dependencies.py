"""Every third-party import is declared in setup.cfg, and the scripts keep DeepSpeed's ops cache per venv.

The rule (imports parsed with ast; module -> distribution by importlib.metadata.packages_distributions,
falling back to the module name with '_' read as '-' for a module that is not installed):
- ds_moe_div/ and scripts/: an import at module level must be in `install_requires`. An import that is
  guarded (inside a function, under `try: ... except ImportError`, or under `if TYPE_CHECKING:`) may
  instead be in any extra of `extras_require` (e.g. `hf`, `eval`): it only runs when asked for.
- tests/: in `install_requires` or any extra (the suite runs with `.[test]` and the extras it uses).
A transitive dependency does not count: `psutil` comes with deepspeed today, but is declared because
the project imports it.
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCAL = {"ds_moe_div", "tests", "__future__"}
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(text: str) -> set[str]:
    """Distribution names in a setup.cfg list (one per line or ';'-separated; markers are skipped)."""
    names = set()
    for item in re.split(r"[\n;]", text):
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^]]*])?\s*([<>=!~ ]|$)", item)
        if m and not re.match(r"\s*(python_version|sys_platform|platform_|implementation_|os_name|extra)", item):
            names.add(normalise(m.group(1)))
    return names


def declared() -> tuple[set[str], set[str]]:
    """(install_requires, union of all extras) from setup.cfg, normalised."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    core = requirement_names(cfg.get("options", "install_requires", fallback=""))
    extras = set()
    if cfg.has_section("options.extras_require"):
        for _, value in cfg.items("options.extras_require"):
            extras |= requirement_names(value)
    return core, extras


def is_guard(node: ast.AST) -> bool:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return True
    if isinstance(node, ast.Try):
        caught = set()
        for handler in node.handlers:
            types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
            caught |= {getattr(t, "id", getattr(t, "attr", None)) for t in types if t is not None}
        return bool(caught & IMPORT_ERRORS)
    if isinstance(node, ast.If):
        test = node.test
        return getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING"
    return False


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level module, line, guarded) of every absolute import in a file."""
    found = []

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name.split(".")[0], node.lineno, guarded) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.lineno, guarded))
        for child in ast.iter_child_nodes(node):
            # the handlers of a guarding try are not guarded (a fallback import there must exist)
            inner = guarded or (is_guard(node) and not isinstance(child, ast.ExceptHandler))
            visit(child, inner)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return found


def distributions(module: str, mapping: dict[str, list[str]]) -> set[str]:
    return {normalise(d) for d in mapping.get(module, [])} or {normalise(module)}


def third_party(paths: list[Path]):
    local = LOCAL | {p.stem for p in (ROOT / "scripts").glob("*.py")}
    for path in paths:
        for module, line, guarded in imports(path):
            if module not in sys.stdlib_module_names and module not in local:
                yield path.relative_to(ROOT), module, line, guarded


def undeclared(paths: list[Path], *, package_code: bool) -> list[str]:
    core, extras = declared()
    mapping = importlib.metadata.packages_distributions()
    problems = []
    for where, module, line, guarded in third_party(paths):
        allowed = core if (package_code and not guarded) else core | extras
        dists = distributions(module, mapping)
        if not dists & allowed:
            need = "install_requires" if allowed is core else "install_requires or an extra"
            problems.append(f"{where}:{line}: import {module} ({'/'.join(sorted(dists))}) is not in {need}")
    return problems


def test_package_and_script_imports_are_declared():
    paths = sorted((ROOT / "ds_moe_div").rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))
    assert undeclared(paths, package_code=True) == []


def test_test_imports_are_declared():
    assert undeclared(sorted((ROOT / "tests").glob("*.py")), package_code=False) == []


def test_the_rule_itself(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "import os\nimport numpy as np\nfrom yaml import safe_load\n"
        "try:\n    import peft\nexcept ImportError:\n    peft = None\n"
        "def f():\n    import psutil\n"
        "try:\n    import torch\nfinally:\n    pass\n"
    )
    assert imports(src) == [("os", 1, False), ("numpy", 2, False), ("yaml", 3, False), ("peft", 5, True),
                            ("psutil", 9, True), ("torch", 11, False)]
    assert requirement_names("torch>=2.4\n  deepspeed==0.19.8\npyyaml>=6; python_version>'3'") == {
        "torch", "deepspeed", "pyyaml"}
    assert requirement_names("pytest>=8; ruff>=0.5") == {"pytest", "ruff"}
    mapping = importlib.metadata.packages_distributions()
    assert distributions("yaml", mapping) == {"pyyaml"} and distributions("not_installed_x", {}) == {
        "not-installed-x"}
    assert "psutil" in declared()[0]


def test_scripts_keep_the_ops_cache_inside_the_venv():
    line = "TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"
    for script in ("setup_env.sh", "test.sh", "run_default.sh"):
        assert line in (ROOT / "scripts" / script).read_text(), script

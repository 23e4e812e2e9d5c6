"""Packaging hygiene: what PyPI shows and what the package declares.

* README.md (PyPI's project page) refers to nothing outside the repository: no ``../``, no
  URLs, every relative link and every path it names resolves to a file in the repository.
* Every third-party module the package imports is a declared dependency (imports inside
  functions may come from an extra instead: optional integrations), and every declared
  dependency is imported.
* LICENSE exists, is the license pyproject.toml names, and lands in the built wheel.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the dev extra installs tomli on 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lightning_precond"
README = ROOT / "README.md"

# Import name -> distribution name, where they differ or to avoid guessing from what is
# installed. Unlisted names fall back to the installed distributions' own records.
DISTRIBUTION_OF_IMPORT = {
    "torch": "torch",
    "lightning": "lightning",
    "typing_extensions": "typing_extensions",
    "deepspeed": "deepspeed",
    "accelerate": "accelerate",
}
# Extras that do not count for the package's own lazy imports (the project's test tools).
NON_RUNTIME_EXTRAS = {"dev"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _normalize(name: str) -> str:
    """PEP 503 normalized distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"cannot read a distribution name from requirement {requirement!r}"
    return _normalize(match.group(1))


# --------------------------------------------------------------------------- README


def _without_fenced_blocks(text: str) -> str:
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.MULTILINE | re.DOTALL)


def _inside_repository(target: str) -> bool:
    resolved = (ROOT / target).resolve()
    return resolved == ROOT or ROOT in resolved.parents


def test_readme_has_no_path_or_url_leaving_the_repository():
    text = README.read_text()
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        if "../" in line or "..\\" in line:
            problems.append(f"README.md:{number}: parent-directory path: {line.strip()}")
        if re.search(r"\b[a-z][a-z0-9+.-]*://", line, flags=re.IGNORECASE):
            problems.append(f"README.md:{number}: URL: {line.strip()}")
    assert not problems, "\n".join(problems)


def _link_targets(text: str) -> list[str]:
    inline = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    reference = re.findall(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", text, flags=re.MULTILINE)
    html = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']+)["']""", text)
    return inline + reference + html


def test_readme_links_resolve_to_repository_files():
    text = _without_fenced_blocks(README.read_text())
    targets = _link_targets(text)
    problems = []
    for target in targets:
        path = target.split("#", 1)[0]
        if not path:
            continue  # an anchor on the same page
        if re.match(r"[a-z][a-z0-9+.-]*:", path, flags=re.IGNORECASE) or path.startswith("/"):
            problems.append(f"{target}: not a path relative to the repository")
        elif not _inside_repository(path) or not (ROOT / path).exists():
            problems.append(f"{target}: no such file in the repository")
    assert not problems, "README.md links:\n" + "\n".join(problems)
    assert "docs/algorithms.md" in targets, "README.md should link the algorithms page"


def test_readme_named_paths_exist():
    """Inline-code paths whose first part is an entry of the repository root must exist."""
    text = _without_fenced_blocks(README.read_text())
    top_level = {p.name for p in ROOT.iterdir()}
    problems = []
    for span in re.findall(r"`([^`\n]+)`", text):
        if not re.fullmatch(r"[\w.-]+(/[\w.-]*)+", span):
            continue
        if span.split("/", 1)[0] not in top_level:
            continue  # not a repository path (e.g. a module path)
        if not _inside_repository(span) or not (ROOT / span).exists():
            problems.append(span)
    assert not problems, f"README.md names paths that do not exist: {problems}"


# --------------------------------------------------------------------------- dependencies


@dataclass(frozen=True)
class _Import:
    module: str  # top-level module name
    where: str  # file:line
    lazy: bool  # inside a function, under TYPE_CHECKING, or guarded by `except ImportError`


def _catches_import_error(node: ast.Try) -> bool:
    for handler in node.handlers:
        if handler.type is None:
            return True
        types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        names = [t.id if isinstance(t, ast.Name) else getattr(t, "attr", "") for t in types]
        if {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"} & set(names):
            return True
    return False


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports_of(path: Path) -> list[_Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[_Import] = []
    rel = path.relative_to(ROOT)

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            lazy = True
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(_Import(alias.name.split(".")[0], f"{rel}:{node.lineno}", lazy))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(_Import(node.module.split(".")[0], f"{rel}:{node.lineno}", lazy))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, lazy)
            return
        if isinstance(node, ast.Try) and _catches_import_error(node):
            for child in node.body:
                visit(child, True)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, lazy)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, lazy)

    visit(tree, False)
    return found


def _third_party_imports() -> list[_Import]:
    imports = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for imp in _imports_of(path):
            if imp.module in sys.stdlib_module_names or imp.module == "__future__":
                continue
            if imp.module == PACKAGE.name:
                continue
            imports.append(imp)
    return imports


def _distribution(module: str) -> str:
    if module in DISTRIBUTION_OF_IMPORT:
        return _normalize(DISTRIBUTION_OF_IMPORT[module])
    installed = importlib.metadata.packages_distributions().get(module)
    return _normalize(installed[0] if installed else module)


def test_import_scan_sees_the_package():
    modules = {imp.module for imp in _third_party_imports()}
    assert {"torch", "lightning"} <= modules, modules  # the walker is not vacuous


def test_every_import_is_declared():
    project = _pyproject()["project"]
    required = {_requirement_name(r) for r in project.get("dependencies", [])}
    optional = {
        _requirement_name(r)
        for extra, reqs in project.get("optional-dependencies", {}).items()
        if extra not in NON_RUNTIME_EXTRAS
        for r in reqs
    }
    problems = []
    for imp in _third_party_imports():
        dist = _distribution(imp.module)
        if dist in required:
            continue
        if imp.lazy and dist in optional:
            continue
        where = "dependencies or an extra (lazy import)" if imp.lazy else "dependencies"
        problems.append(f"{imp.where}: imports {imp.module!r} (distribution {dist!r}), not in {where}")
    assert not problems, "\n".join(problems)


def test_every_dependency_is_imported():
    declared = {_requirement_name(r) for r in _pyproject()["project"].get("dependencies", [])}
    imported = {_distribution(imp.module) for imp in _third_party_imports()}
    unused = sorted(declared - imported)
    assert not unused, f"declared in dependencies but never imported by {PACKAGE.name}/: {unused}"


# --------------------------------------------------------------------------- license

# SPDX id -> phrases the license text must contain.
LICENSE_TEXTS = {
    "Apache-2.0": ("Apache License", "Version 2.0, January 2004",
                   "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION"),
}
# setuptools' default license-files patterns.
DEFAULT_LICENSE_FILES = ["LICEN[CS]E*", "COPYING*", "NOTICE*", "AUTHORS*"]


def _declared_license() -> str:
    license_ = _pyproject()["project"]["license"]
    if isinstance(license_, dict):  # the older table form
        return license_.get("text") or (ROOT / license_["file"]).read_text().splitlines()[0].strip()
    return license_


def test_license_file_matches_pyproject():
    spdx = _declared_license()
    assert spdx in LICENSE_TEXTS, f"pyproject.toml license {spdx!r}: add its expected text to this test"
    license_file = ROOT / "LICENSE"
    assert license_file.is_file(), "LICENSE is missing"
    text = license_file.read_text()
    for phrase in LICENSE_TEXTS[spdx]:
        assert phrase in text, f"LICENSE does not read like {spdx}: {phrase!r} not found"
    patterns = _pyproject()["project"].get("license-files", DEFAULT_LICENSE_FILES)
    assert any(fnmatch.fnmatch("LICENSE", pattern) for pattern in patterns), patterns


def test_wheel_metadata_carries_license_and_dependencies(tmp_path):
    """Build the wheel (pip, isolated build with the declared backend) from a copy of the
    packaging files and read what PyPI would receive."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q",
         "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(zf.read(metadata_name).decode())
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert "LICENSE" in metadata.get_all("License-File", [])
    assert _declared_license() in (metadata.get("License-Expression"), metadata.get("License"))
    runtime = {
        _requirement_name(r) for r in metadata.get_all("Requires-Dist", []) if "extra ==" not in r
    }
    declared = {_requirement_name(r) for r in _pyproject()["project"]["dependencies"]}
    assert runtime == declared

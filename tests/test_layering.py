"""The package layering, read from the source (``ast``), not from what happens to be imported at run time.

configs <- symbols / iterators / metrics / eval <- recognition (benchmarks and tests may import anything):

* symbols/, iterators/, metrics/ and eval/ never import recognition/ or configs/;
* no two library packages import each other; the one allowed edge between them is ``eval`` ->
  ``iterators.formats`` (the single home of the file formats, which imports no other project package);
* configs/ imports no project package;
* no project module is named like a standard-library module (``python -m pkg.inspect`` shadows nothing,
  but ``import inspect`` inside the package would find the project's file first under some path setups).
"""
import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("configs", "symbols", "iterators", "metrics", "eval", "recognition")
LIBRARY = ("symbols", "iterators", "metrics", "eval")
# (importing package, imported module prefix) edges allowed between library packages.
ALLOWED_CROSS = {("eval", "iterators.formats")}


def _modules(package):
    for path in sorted((ROOT / package).rglob("*.py")):
        yield path


def _imports(path):
    """Absolute dotted names imported by ``path`` (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    if parts[-1] == "__init__":
        package = parts[:-1]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names]
    return names


def _project_edges():
    edges = []
    for package in PACKAGES:
        for path in _modules(package):
            for name in _imports(path):
                top = name.split(".")[0]
                if top in PACKAGES and top != package:
                    edges.append((package, name, path.relative_to(ROOT).as_posix()))
    return edges


def test_library_packages_never_import_recognition_or_configs():
    bad = [(where, name) for package, name, where in _project_edges()
           if package in LIBRARY and name.split(".")[0] in ("recognition", "configs")]
    assert not bad, f"library code imports the layer above it: {bad}"


def test_library_packages_do_not_import_each_other_except_the_formats_home():
    bad = []
    for package, name, where in _project_edges():
        top = name.split(".")[0]
        if package in LIBRARY and top in LIBRARY:
            if not any(package == src and (name == dst or name.startswith(dst + ".")) for src, dst in ALLOWED_CROSS):
                bad.append((where, name))
    assert not bad, f"imports between library packages: {bad}"


def test_formats_home_imports_no_other_project_package():
    bad = []
    for path in _modules("iterators/formats"):
        for name in _imports(path):
            top = name.split(".")[0]
            if top in PACKAGES and not name.startswith("iterators.formats"):
                bad.append((path.relative_to(ROOT).as_posix(), name))
    assert not bad, bad


def test_configs_import_no_project_package():
    bad = [(where, name) for package, name, where in _project_edges() if package == "configs"]
    assert not bad, bad


def test_no_module_shadows_the_standard_library():
    stdlib = set(sys.stdlib_module_names)
    bad = [p.relative_to(ROOT).as_posix() for package in PACKAGES for p in _modules(package)
           if p.stem in stdlib and p.stem != "__init__"]
    bad += [package for package in PACKAGES if package in stdlib]
    assert not bad, f"modules named like standard-library modules: {bad}"


@pytest.mark.parametrize("source, expected", [
    ("from . import losses\n", "symbols.losses"),
    ("from .common import act\n", "symbols.common.act"),
    ("from configs.base import config\n", "configs.base"),
])
def test_import_parser_resolves_relative_and_absolute_imports(tmp_path, monkeypatch, source, expected):
    module = ROOT / "symbols" / "_layering_probe.py"
    monkeypatch.setattr(pathlib.Path, "read_text", lambda self, encoding=None: source)
    assert expected in _imports(module)

"""The distribution: every package folder is listed, imports run only downward (stages on top of the shared
layers, never sideways), no import circles, and prep stays free of torch."""

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import toml as tomllib  # type: ignore[no-redef]

import pytest

from conftest import REPO

STAGES = ("prep", "captioning", "train", "use")
LAYERS = {"common": 0, "models": 1, "lorafile": 2}
"""Each layer may import the layers below it; every stage may import every layer, and only itself besides."""
PACKAGES = (*LAYERS, *STAGES)


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def package_folders() -> set[str]:
    """Every folder under a stage that holds Python modules, as the dotted package name it must ship as."""
    found = set()
    for package in PACKAGES:
        for module in (REPO / package).rglob("*.py"):
            rel = module.parent.relative_to(REPO).parts
            found.add(".".join(["lorasmith", *rel]))
    return found


def test_every_package_folder_is_listed():
    setuptools = pyproject()["tool"]["setuptools"]
    assert set(setuptools["packages"]) >= package_folders()
    for package, folder in setuptools["package-dir"].items():
        assert package == f"lorasmith.{folder}" and (REPO / folder).is_dir()


def test_the_wheel_holds_every_module(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("lorasmith-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in PACKAGES:
        for module in (REPO / package).rglob("*.py"):
            assert f"lorasmith/{module.relative_to(REPO).as_posix()}" in names
    assert not any(n.split("/")[0] in PACKAGES for n in names), "a package leaked into site-packages top level"
    assert {"lorasmith/models/clip/vocab.json", "lorasmith/models/clip/merges.txt"} <= names  # the shipped tokenizer


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def allowed(importer: str, imported: str) -> bool:
    """Whether package `importer` may import package `imported`: itself, or a layer below it."""
    if imported == importer:
        return True
    if importer in STAGES:
        return imported in LAYERS
    return imported in LAYERS and LAYERS[imported] < LAYERS[importer]


@pytest.mark.parametrize("importer, imported, ok", [
    ("use", "lorafile", True), ("use", "models", True), ("use", "train", False), ("train", "prep", False),
    ("train", "common", True), ("lorafile", "models", True), ("models", "lorafile", False), ("common", "models", False),
    ("prep", "prep", True),
])
def test_the_direction_rule(importer, imported, ok):
    assert allowed(importer, imported) is ok


def module_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports, at the top or inside a function alike."""
    graph = {}
    for package in PACKAGES:
        for module in (REPO / package).rglob("*.py"):
            name = ".".join(["lorasmith", *module.relative_to(REPO).with_suffix("").parts])
            graph[name] = {n for n in imports_of(module) if n.startswith("lorasmith.")}
            assert not {n.split(".")[0] for n in imports_of(module)} & set(PACKAGES), \
                f"{module}: a bare import of a package; use lorasmith.<package>"
    return graph


def test_imports_run_only_downward_and_never_between_stages():
    wrong = [f"{module} imports {name}" for module, names in module_graph().items() for name in names
             if not allowed(module.split(".")[1], name.split(".")[1])]
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_itself_through_others():
    graph = module_graph()
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for name in sorted(graph.get(module, ())):
            target = name if name in graph else name.rsplit(".", 1)[0]  # `from pkg import module` names the package
            if state.get(target) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(target):], target]))
            if target in graph and not state.get(target):
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module, [module])


def test_prep_and_the_layer_under_it_never_import_torch():
    for module in [*(REPO / "prep").rglob("*.py"), *(REPO / "common").rglob("*.py")]:
        assert not any(n.split(".")[0] in ("torch", "diffusers", "transformers") for n in imports_of(module)), module

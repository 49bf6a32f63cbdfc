"""The distribution: every package folder is listed, stages depend one way, prep stays free of torch."""

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import toml as tomllib  # type: ignore[no-redef]

from conftest import REPO

STAGES = {"prep": 0, "captioning": 1, "train": 2, "use": 3}


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def package_folders() -> set[str]:
    """Every folder under a stage that holds Python modules, as the dotted package name it must ship as."""
    found = set()
    for stage in STAGES:
        for module in (REPO / stage).rglob("*.py"):
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
    for stage in STAGES:
        for module in (REPO / stage).rglob("*.py"):
            assert f"lorasmith/{module.relative_to(REPO).as_posix()}" in names
    assert not any(n.split("/")[0] in STAGES for n in names), "a stage leaked into site-packages top level"
    assert {"lorasmith/train/clip/vocab.json", "lorasmith/train/clip/merges.txt"} <= names  # the shipped tokenizer


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_stages_import_only_earlier_stages_by_absolute_name():
    for stage, rank in STAGES.items():
        for module in (REPO / stage).rglob("*.py"):
            for name in imports_of(module):
                top = name.split(".")[0]
                assert top not in STAGES, f"{module}: bare `import {name}`; use lorasmith.{name}"
                if name.startswith("lorasmith."):
                    other = name.split(".")[1]
                    assert STAGES[other] <= rank, f"{module} imports the later stage {name}"


def test_prep_never_imports_torch():
    for module in (REPO / "prep").rglob("*.py"):
        assert not any(n.split(".")[0] in ("torch", "diffusers", "transformers") for n in imports_of(module)), module

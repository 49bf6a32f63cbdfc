from pathlib import Path

import pytest

from lorasmith.common.layout import (
    output_stems,
    parse_repeat_folder,
    repeat_folder_name,
    repeat_folders,
    safe_stem,
    scan_sources,
    validate_name,
)


@pytest.mark.parametrize(
    "name, parsed",
    [
        ("10_clay", (10, "clay")),
        ("100_ACD3DICON", (100, "ACD3DICON")),
        ("5_claymation style", (5, "claymation style")),
        ("20_my_style", (20, "my_style")),
        ("0_clay", None),
        ("clay", None),
        ("10clay", None),
        ("x_10", None),
    ],
)
def test_parse_repeat_folder(name, parsed):
    got = parse_repeat_folder(Path(name))
    assert (got and (got.repeats, got.tokens)) == parsed or (got is None and parsed is None)


def test_repeat_folder_name_round_trips():
    name = repeat_folder_name(137, "claymation style")
    assert name == "137_claymation style"
    parsed = parse_repeat_folder(Path(name))
    assert (parsed.repeats, parsed.tokens) == (137, "claymation style")


def test_repeat_folders_accepts_a_root_or_one_folder(tmp_path):
    for name in ("10_a", "5_b", "notes", "0_c"):
        (tmp_path / name).mkdir()
    assert [f.path.name for f in repeat_folders(tmp_path)] == ["10_a", "5_b"]
    assert [f.tokens for f in repeat_folders(tmp_path / "10_a")] == ["a"]


@pytest.mark.parametrize("bad", ["", "   ", "a/b", "a:b", ".."])
def test_validate_name_rejects(bad):
    with pytest.raises(ValueError, match="NAME"):
        validate_name(bad)


def test_validate_name_keeps_spaces_and_unicode():
    assert validate_name("  pâte à modeler ") == "pâte à modeler"


@pytest.mark.parametrize("stem, safe", [("cat", "cat"), ("a:b*c", "a_b_c"), ("pâte", "pâte"), ("...", "image")])
def test_safe_stem(stem, safe):
    assert safe_stem(stem) == safe


def test_output_stems_keep_stems_and_split_collisions(tmp_path):
    src = tmp_path
    files = [src / "cat.jpg", src / "Cat.png", src / "dog.png", src / "sub" / "dog.png", src / "émile.JPG"]
    stems = output_stems(files, src)
    assert stems[src / "cat.jpg"] == "cat_jpg"
    assert stems[src / "Cat.png"] == "Cat_png"
    assert stems[src / "dog.png"] == "dog_png"
    assert stems[src / "sub" / "dog.png"] == "sub_dog_png"
    assert stems[src / "émile.JPG"] == "émile"
    assert len({s.casefold() for s in stems.values()}) == len(files)


def test_scan_sources_skips_sidecars_hidden_and_the_output_tree(tmp_path):
    for rel in ["a.png", "a.txt", "b.caption", ".hidden.png", "Thumbs.db", "notes.md", "x.dat", "sub/c.JPG",
                "out/10_x/a.png", ".git/obj.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in scan_sources(tmp_path, exclude=[tmp_path / "out"]).files]
    assert found == ["a.png", "x.dat", "sub/c.JPG"]

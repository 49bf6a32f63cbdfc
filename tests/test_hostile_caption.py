"""caption-folder against messy folders and hasty options: nothing the user owns is ever damaged."""

import os
import signal
import stat

import pytest

from conftest import make_image, training_root
from hostile import check, check_result, run, slow_replace, snapshot, start, tiny_disk, unprivileged, wait_for_mark


def caption(folder, *extra, **kwargs):
    return run("caption-folder", folder, *extra, **kwargs)


def prefix_only(folder, *extra, **kwargs):
    return caption(folder, "--prefix", "claymation style", "--prefix-only", *extra, **kwargs)


@pytest.mark.parametrize("extra", [["--prefix-only"], ["--overwrite", "--model", "nowhere/blip"]])
@pytest.mark.parametrize("extension", [".png", ".JPG", ".webp"])
def test_a_picture_extension_for_captions_is_refused(tmp_path, extension, extra):
    root = training_root(tmp_path / "data", {"10_clay": 2})
    before = snapshot(root)
    done = caption(root, "--prefix", "clay", "--caption-extension", extension, *extra)
    check(done, 2, "--caption-extension")
    assert snapshot(root) == before


def test_utf16_and_bom_captions_are_read_as_text_and_written_back_as_utf8(tmp_path):
    root = training_root(tmp_path / "data", {"10_clay": 3})
    folder = root / "10_clay"
    (folder / "img0.txt").write_bytes("a ball, été".encode("utf-16"))
    (folder / "img1.txt").write_bytes("\ufeffclaymation style, a cube".encode("utf-8"))
    (folder / "img2.txt").write_bytes("a cone".encode("utf-16-be"))
    done = prefix_only(root)
    check(done, 0)
    assert (folder / "img0.txt").read_bytes().decode("utf-8") == "claymation style, a ball, été\n"
    assert (folder / "img1.txt").read_bytes().decode("utf-8") == "claymation style, a cube\n"
    assert (folder / "img2.txt").read_bytes().decode("utf-8") == "claymation style, a cone\n"


def test_a_caption_that_is_not_text_is_named_and_left_untouched(tmp_path):
    root = training_root(tmp_path / "data", {"10_clay": 2})
    (root / "10_clay" / "img0.txt").write_bytes("caf\xe9, a ball".encode("latin-1"))
    before = snapshot(root)
    done = prefix_only(root)
    check(done, 1, "img0.txt", "UTF-8")
    assert snapshot(root)["10_clay/img0.txt"] == before["10_clay/img0.txt"]
    assert (root / "10_clay" / "img1.txt").read_text(encoding="utf-8") == "claymation style\n"


def test_read_only_captions_stay_read_only_and_unchanged(tmp_path):
    root = training_root(tmp_path / "data", {"10_clay": 2})
    locked = root / "10_clay" / "img0.txt"
    locked.write_text("a ball", encoding="utf-8")
    locked.chmod(0o444)
    mine = root / "10_clay" / "img1.txt"
    mine.write_text("a cube", encoding="utf-8")
    mine.chmod(0o640)
    done = prefix_only(root)
    check(done, 0, "img0.txt")
    assert stat.S_IMODE(locked.stat().st_mode) == 0o444 and locked.read_text(encoding="utf-8") == "a ball"
    assert stat.S_IMODE(mine.stat().st_mode) == 0o640
    assert mine.read_text(encoding="utf-8") == "claymation style, a cube\n"


def test_no_sidecar_for_a_file_that_is_not_a_picture(tmp_path):
    root = training_root(tmp_path / "data", {"10_clay": 1})
    folder = root / "10_clay"
    (folder / "notes.png").write_text("not a picture", encoding="utf-8")
    (folder / "empty.png").write_bytes(b"")
    good = make_image(folder / "whole.png", size=(64, 64))
    (folder / "cut.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    done = prefix_only(root)
    check(done, 1, "notes.png", "empty.png", "cut.png")
    assert sorted(p.name for p in folder.glob("*.txt")) == ["img0.txt", "whole.txt"]


def test_a_caption_path_that_is_a_folder_is_named_and_the_rest_go_on(tmp_path):
    root = training_root(tmp_path / "data", {"10_clay": 2})
    (root / "10_clay" / "img0.txt").mkdir()
    done = prefix_only(root)
    check(done, 1, "img0.txt")
    assert (root / "10_clay" / "img0.txt").is_dir()
    assert (root / "10_clay" / "img1.txt").read_text(encoding="utf-8") == "claymation style\n"


def test_two_pictures_sharing_one_sidecar_are_named_and_not_captioned(tmp_path):
    folder = tmp_path / "10_clay"
    make_image(folder / "cat.png", size=(64, 64), seed=1)
    make_image(folder / "cat.jpg", size=(64, 64), seed=2)
    make_image(folder / "dog.png", size=(64, 64), seed=3)
    done = prefix_only(folder)
    check(done, 1, "cat.png", "cat.jpg")
    assert sorted(p.name for p in folder.glob("*.txt")) == ["dog.txt"]


def test_unreadable_captions_and_read_only_folders_are_named(tmp_path):
    prefix = unprivileged()
    root = training_root(tmp_path / "data", {"10_clay": 2, "5_style": 1})
    (root / "10_clay" / "img0.txt").write_text("a ball", encoding="utf-8")
    (root / "10_clay" / "img0.txt").chmod(0)
    (root / "5_style").chmod(0o555)
    try:
        done = prefix_only(root, prefix=prefix)
    finally:
        (root / "5_style").chmod(0o755)
    check(done, (1, 2), "img0.txt", "5_style")


@pytest.mark.parametrize("options, named", [
    (["--top-p", "2"], "--top-p"), (["--top-p", "0"], "--top-p"), (["--num-beams", "0"], "--num-beams"),
    (["--min-length", "10", "--max-length", "5"], "--min-length"), (["--max-length", "0"], "--max-length"),
    (["--batch-size", "0"], "--batch-size"), (["--general-threshold", "1.5"], "--general-threshold"),
    (["--character-threshold", "-0.1"], "--character-threshold"), (["--seed", "-1"], "--seed"),
])
def test_out_of_range_generation_options_are_refused_before_any_model_loads(tmp_path, options, named):
    root = training_root(tmp_path / "data", {"10_clay": 1})
    done = caption(root, "--model", "nowhere/blip", *options)
    check(done, 2, named)


def test_a_second_run_on_the_same_folder_is_refused_naming_the_first(tmp_path):
    root, mark = training_root(tmp_path / "data", {"10_clay": 3}), tmp_path / "mark"
    first = start("caption-folder", root, "--prefix", "clay", "--prefix-only", env=slow_replace(".txt", 2, mark))
    wait_for_mark(mark, first)
    second = prefix_only(root)
    check(second, 2, str(first.pid), "caption-folder")
    _, err = first.communicate(timeout=60)
    check_result(first.returncode, 0, err)


def test_leftovers_of_a_killed_run_are_cleared(tmp_path):
    root = training_root(tmp_path / "data", {"10_clay": 1})
    (root / "10_clay" / ".img0.txt.k3j2h1.part").write_text("half", encoding="utf-8")
    check(prefix_only(root), 0)
    assert not list(root.rglob("*.part"))


def test_ctrl_c_stops_cleanly(tmp_path):
    root, mark = training_root(tmp_path / "data", {"10_clay": 3}), tmp_path / "mark"
    process = start("caption-folder", root, "--prefix", "clay", "--prefix-only", env=slow_replace(".txt", 1, mark))
    wait_for_mark(mark, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    check_result(process.returncode, 130, err, "run it again")
    assert not list(root.rglob("*.part"))


def test_pictures_outside_repeat_folders_are_named(tmp_path):
    root = training_root(tmp_path / "data", {"10_clay": 1, "raw": 1, "0_zero": 1, "abc_x": 1, "10_": 1})
    done = prefix_only(root)
    check(done, 0, "raw", "0_zero", "abc_x", "10_")
    assert not (root / "raw" / "img0.txt").exists()


def test_disk_full_is_one_message_and_every_caption_is_whole(tmp_path):
    with tiny_disk(tmp_path / "disk", 1024, leave_kib=48) as disk:
        root = training_root(disk / "data", {"10_clay": 4})
        for i in range(4):
            (root / "10_clay" / f"img{i}.txt").write_text(f"a ball {i}", encoding="utf-8")
        (disk / "pad").write_bytes(b"\0" * (os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - 2048))
        before = snapshot(root)
        done = caption(root, "--prefix", "claymation style, " + "x" * 3000, "--prefix-only")
        check(done, 1, "MiB free", str(root / "10_clay"))
        assert (done.stderr + done.stdout).count(" is full") == 1, done.stderr
        after = snapshot(root)
        assert {k: v for k, v in after.items() if not k.endswith(".txt")} == pictures_of(before)
        for name, (digest, _) in after.items():
            if name.endswith(".txt"):
                text = (root / name).read_text(encoding="utf-8")
                assert digest == before[name][0] or text.startswith("claymation style, xxx"), name
        assert not list(root.rglob("*.part"))


def pictures_of(snap):
    return {k: v for k, v in snap.items() if not k.endswith(".txt")}


@pytest.mark.parametrize("option, value", [
    ("--prefix", "clay\nstyle"), ("--prefix", "clay style\r"), ("--postfix", "high\tquality"),
    ("--separator", ",\n"), ("--prefix", "clay\x1b[0m"),
])
def test_a_line_break_or_control_character_in_the_caption_words_is_refused(tmp_path, option, value):
    root = training_root(tmp_path / "data", {"10_clay": 2})
    (root / "10_clay" / "img0.txt").write_text("a ball", encoding="utf-8")
    before = snapshot(root)
    done = caption(root, "--prefix-only", option, value)
    check(done, 2, option, "U+00")
    assert done.stderr.strip().splitlines()[-1].startswith(f"caption-folder: error: argument {option}: holds ")
    assert snapshot(root) == before


@pytest.mark.parametrize("old, new, position", [("(", "x", "position 0"), ("ball[", "x", "position 4"),
                                                ("(ball)", r"\2", "position 1")])
def test_a_regular_expression_that_does_not_compile_is_one_message(tmp_path, old, new, position):
    root = training_root(tmp_path / "data", {"10_clay": 2})
    for i in range(2):
        (root / "10_clay" / f"img{i}.txt").write_text("clay, a ball", encoding="utf-8")
    before = snapshot(root)
    done = run("captions", "replace", root, old, new, "--regex")
    check(done, 2, f"'{old if new == 'x' else new}'", position)
    assert len((done.stderr + done.stdout).strip().splitlines()) == 1, done.stderr
    assert snapshot(root) == before


def test_a_replacement_that_would_break_a_caption_into_lines_is_refused(tmp_path):
    root = training_root(tmp_path / "data", {"10_clay": 1})
    (root / "10_clay" / "img0.txt").write_text("clay, a ball", encoding="utf-8")
    before = snapshot(root)
    check(run("captions", "replace", root, "ball", "a\nball"), 2, "NEW", "U+000A")
    check(run("captions", "replace", root, "ball", r"a\nball", "--regex"), 1, "img0.txt", "U+000A")
    assert snapshot(root) == before

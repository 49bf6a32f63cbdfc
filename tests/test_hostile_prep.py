"""prep-images against messy folders, hasty hands, two terminals, full disks and Ctrl-C at bad moments."""

import json
import os
import random
import signal
import socket

import pytest
from PIL import Image

from conftest import make_image
from hostile import check, check_result, run, slow_replace, snapshot, start, tiny_disk, unprivileged, wait_for_mark


def prep(src, out, *extra, **kwargs):
    return run("prep-images", src, "--out", out, "--name", "x", "--quiet", *extra, **kwargs)


def report(out):
    return {e["source"]: e for e in json.loads((out / "prep_report.json").read_text(encoding="utf-8"))["entries"]}


def test_special_files_are_skipped_by_type_never_opened(tmp_path):
    src = tmp_path / "src"
    make_image(src / "a.png", size=(600, 600))
    os.mkfifo(src / "pipe.png")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "sock.jpg"))
    before = snapshot(src)
    try:
        done = prep(src, tmp_path / "out", "--workers", "1", timeout=60)
    finally:
        sock.close()
    check(done, 0, "pipe.png", "sock.jpg")
    entries = report(tmp_path / "out")
    assert entries["pipe.png"]["status"] == entries["sock.jpg"]["status"] == "skipped"
    assert "named pipe" in entries["pipe.png"]["reason"] and "socket" in entries["sock.jpg"]["reason"]
    assert entries["a.png"]["status"] == "written" and snapshot(src) == before


def test_undecodable_and_over_long_names_are_written_under_safe_names(tmp_path):
    src = tmp_path / "src"
    make_image(src / os.fsdecode(b"caf\xe9.png"), size=(600, 600), seed=1)
    make_image(src / ("é" * 120 + ".png"), size=(600, 600), seed=2)   # 240 bytes of UTF-8
    make_image(src / ("b" * 250 + ".jpg"), size=(600, 600), seed=3)
    before = snapshot(src)
    done = prep(src, tmp_path / "out")
    check(done, 0)
    outputs = sorted(os.listdir(os.fsencode(tmp_path / "out" / "500_x")))
    assert len([o for o in outputs if o.endswith(b".png")]) == 3
    assert all(len(name) <= 255 and name.decode("utf-8") for name in outputs)
    assert all(e["status"] == "written" for e in report(tmp_path / "out").values())
    assert snapshot(src) == before


def test_truncated_picture_is_named_and_the_rest_written(tmp_path):
    src = tmp_path / "src"
    good = make_image(src / "good.png", size=(600, 600))
    (src / "cut.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    done = prep(src, tmp_path / "out")
    check(done, 1, "cut.png")
    assert report(tmp_path / "out")["good.png"]["status"] == "written"


def test_caption_that_is_a_folder_in_dst_is_named_and_left_alone(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_image(src / "a.png", size=(600, 600))
    (src / "a.txt").write_text("claymation style, a blob", encoding="utf-8")
    check(prep(src, out), 0)
    target = out / "1500_x" / "a.txt"
    target.unlink()
    target.mkdir()
    (src / "a.txt").write_text("claymation style, a red blob", encoding="utf-8")
    check(prep(src, out), 0, "a.txt")
    assert target.is_dir()


def test_unreadable_files_and_folders_are_named(tmp_path):
    prefix = unprivileged()
    src = tmp_path / "src"
    make_image(src / "ok.png", size=(600, 600))
    make_image(src / "locked.png", size=(600, 600), seed=1)
    make_image(src / "sub" / "inner.png", size=(600, 600), seed=2)
    (src / "ok.txt").write_text("a caption", encoding="utf-8")
    for path in (src / "locked.png", src / "ok.txt", src / "sub"):
        path.chmod(0)
    tmp_path.chmod(0o755)
    try:
        done = prep(src, tmp_path / "out", prefix=prefix)
    finally:
        (src / "sub").chmod(0o755)
    check(done, 1, "locked.png", "sub", "ok.txt")
    assert (tmp_path / "out" / "1500_x" / "ok.png").is_file()


def test_read_only_destination_is_one_message(tmp_path):
    prefix = unprivileged()
    src, out = tmp_path / "src", tmp_path / "out"
    make_image(src / "a.png", size=(600, 600))
    out.mkdir()
    out.chmod(0o555)
    tmp_path.chmod(0o755)
    done = prep(src, out, prefix=prefix)
    check(done, 2, str(out))


def test_disk_full_is_one_message_with_the_free_space_and_no_partial_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):  # noise: about 1.2 MB as a PNG, so the disk fills after a couple of pictures
        Image.frombytes("RGB", (700, 700), random.Random(i).randbytes(700 * 700 * 3)).save(src / f"p{i}.png")
    with tiny_disk(tmp_path / "disk", 8192, leave_kib=3000) as disk:
        out = disk / "out"
        done = prep(src, out, "--workers", "1")
        check(done, 1, str(out), "MiB free")
        assert (done.stderr + done.stdout).count(" is full") == 1, done.stderr
        assert not [p for p in out.rglob("*") if p.name.endswith(".part")]
        if (out / "prep_report.json").exists():
            json.loads((out / "prep_report.json").read_text(encoding="utf-8"))


def test_a_second_run_on_the_same_dst_is_refused_naming_the_first(tmp_path):
    src, out, mark = tmp_path / "src", tmp_path / "out", tmp_path / "mark"
    for i in range(2):
        make_image(src / f"p{i}.png", size=(600, 600), seed=i)
    first = start("prep-images", src, "--out", out, "--name", "x", "--quiet", "--workers", "1",
                  env=slow_replace(".png", 2, mark))
    wait_for_mark(mark, first)
    second = prep(src, out)
    check(second, 2, str(first.pid), "prep-images")
    _, err = first.communicate(timeout=60)
    check_result(first.returncode, 0, err)
    assert sorted(p.name for p in (out / "750_x").glob("*.png")) == ["p0.png", "p1.png"]


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_image(src / "a.png", size=(600, 600))
    out.mkdir()
    dead = {"command": "prep-images", "pid": 2**22 + 7, "host": "here", "started": "yesterday"}
    (out / ".lorasmith.lock").write_text(json.dumps(dead), encoding="utf-8")  # what kill -9 leaves behind
    check(prep(src, out), 0)
    assert (out / "1500_x" / "a.png").is_file() and not (out / ".lorasmith.lock").exists()


def test_kill_9_loses_only_the_picture_in_flight(tmp_path):
    src, out, mark = tmp_path / "src", tmp_path / "out", tmp_path / "mark"
    for i in range(6):
        make_image(src / f"p{i}.png", size=(600, 600), seed=i)
    before = snapshot(src)
    first = start("prep-images", src, "--out", out, "--name", "x", "--quiet", "--workers", "1",
                  env=slow_replace(".png", 0.3, mark))
    wait_for_mark(mark, first, lines=4)  # three pictures are in place, the fourth is being renamed
    first.kill()
    first.wait()
    again = prep(src, out)
    check(again, 0)
    assert "6 written (3 new, 3 up to date)" in again.stdout, again.stdout
    assert not [p for p in out.rglob("*") if p.name.endswith(".part")]
    assert snapshot(src) == before


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_stop_cleanly_keeping_finished_work(tmp_path, sig, code):
    src, out, mark = tmp_path / "src", tmp_path / "out", tmp_path / "mark"
    for i in range(4):
        make_image(src / f"p{i}.png", size=(600, 600), seed=i)
    process = start("prep-images", src, "--out", out, "--name", "x", "--quiet", "--workers", "1",
                    env=slow_replace(".png", 1, mark))
    wait_for_mark(mark, process, lines=2)
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    check_result(process.returncode, code, err, "run it again")
    again = prep(src, out)
    check(again, 0)
    assert "(2 new, 2 up to date)" in again.stdout or "(3 new, 1 up to date)" in again.stdout, again.stdout


def test_a_new_name_clash_never_renames_an_output_or_orphans_its_caption(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_image(src / "cat.jpg", size=(600, 600), seed=1)
    check(prep(src, out), 0)
    first = (out / "1500_x" / "cat.png").read_bytes()
    (out / "1500_x" / "cat.txt").write_text("claymation style, my edited caption", encoding="utf-8")
    make_image(src / "cat.png", size=(600, 600), seed=2)
    check(prep(src, out), 0)
    folder = out / "750_x"
    assert (folder / "cat.png").read_bytes() == first
    assert (folder / "cat.txt").read_text(encoding="utf-8") == "claymation style, my edited caption"
    assert (folder / "cat_png.png").is_file()
    assert report(out)["cat.jpg"]["output"] == "cat.png"


@pytest.mark.parametrize("option, value", [("--workers", "0"), ("--max-pixels", "0"), ("--min-side", "-64")])
def test_out_of_range_options_are_refused_naming_the_option(tmp_path, option, value):
    make_image(tmp_path / "src" / "a.png", size=(600, 600))
    done = prep(tmp_path / "src", tmp_path / "out", option, value)
    check(done, 2, option)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, extra", [("x" * 300, []), ("é" * 126, []), ("é" * 127, ["--repeats", "99"])])
def test_a_name_too_long_for_the_repeat_folder_is_refused_naming_the_limit(tmp_path, name, extra):
    make_image(tmp_path / "src" / "a.png", size=(600, 600))
    done = run("prep-images", tmp_path / "src", "--out", tmp_path / "out", "--name", name, "--quiet", *extra)
    check(done, 2, "--name", "255-byte limit")  # auto repeats reach 1500: 1500_ + 252 bytes of é is 257
    assert not (tmp_path / "out").exists()


def test_the_largest_repeat_count_decides_whether_a_long_name_fits(tmp_path):
    make_image(tmp_path / "src" / "a.png", size=(600, 600))
    done = run("prep-images", tmp_path / "src", "--out", tmp_path / "out", "--name", "é" * 126, "--repeats", "9",
               "--quiet")
    check(done, 0)
    assert (tmp_path / "out" / f"9_{'é' * 126}" / "a.png").is_file()


def test_a_run_that_writes_no_picture_leaves_no_empty_repeat_folder(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "notes.png").write_text("not a picture", encoding="utf-8")
    done = prep(src, out)
    check(done, 1, "notes.png")
    assert not [p.name for p in out.iterdir() if p.is_dir()]
    assert report(out)["notes.png"]["status"] == "failed"
    (out / "100_x").mkdir()  # a folder this run did not make stays, empty or not
    check(prep(src, out), 1, "notes.png")
    assert (out / "100_x").is_dir()

"""prepare_folder end to end on small generated folders."""

import hashlib
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from conftest import make_image
from lorasmith.prep.pipeline import UsageError, prepare_folder
from lorasmith.prep.picture import PrepOptions


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Bytes and mtime of every file below `folder`, to prove originals were not touched."""
    return {
        p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def run(src: Path, dst: Path, name: str = "clay", workers: int = 1, **options):
    return prepare_folder(src, dst, name, PrepOptions(**options), workers=workers, progress=False)


def entries(result) -> dict[str, object]:
    return {e.source: e for e in result.report.entries}


def good_folder(root: Path, count: int = 3) -> Path:
    for i in range(count):
        make_image(root / f"img{i}.png", size=(800 + 40 * i, 600), seed=i)
    return root


BAD_INPUTS = {
    "zero.jpg": (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    "notes.pdf": (lambda p: p.write_bytes(b"%PDF-1.4 not a picture"), "not a picture (Pillow cannot identify"),
    "truncated.png": (
        lambda p: p.write_bytes(make_image(p, size=(600, 600)).read_bytes()[:3000]),
        "truncated or corrupt image data",
    ),
    "bomb.png": (lambda p: make_image(p, size=(3000, 3000)), "decompression bomb refused: 3000×3000"),
    "gone.jpg": (lambda p: os.symlink(p.parent / "missing-target.jpg", p), "cannot read the file: it does not exist"),
}


@pytest.mark.parametrize("bad", sorted(BAD_INPUTS))
def test_bad_input_is_reported_and_the_rest_is_written(tmp_path, bad):
    src = good_folder(tmp_path / "src")
    write, reason = BAD_INPUTS[bad]
    write(src / bad)
    before = snapshot(src)
    result = run(src, tmp_path / "out", max_pixels=5_000_000)
    entry = entries(result)[bad]
    assert entry.status == "failed" and entry.reason.startswith(reason), entry.reason
    assert entry.output is None
    assert result.report.counts() == {"written": 3, "skipped": 0, "failed": 1}
    outputs = sorted(p.name for p in result.folder.iterdir())
    assert outputs == ["img0.png", "img1.png", "img2.png"]  # no temporary or partial file left
    assert snapshot(src) == before
    saved = json.loads(result.report_path.read_text())
    assert saved["summary"] == {"written": 3, "skipped": 0, "failed": 1}
    assert {e["source"]: e["reason"] for e in saved["entries"]}[bad] == entry.reason


def test_outputs_are_multiples_of_64_and_the_report_describes_them(tmp_path):
    src = tmp_path / "src"
    make_image(src / "wide.jpg", size=(1600, 600))
    make_image(src / "tall.png", size=(700, 1400))
    make_image(src / "square.webp", size=(900, 900))
    result = run(src, tmp_path / "out", workers=2)
    assert result.folder.name == "500_clay"  # 3 pictures: ceil(1500 / 3)
    for entry in result.report.entries:
        with Image.open(result.folder / entry.output) as out:
            assert out.mode == "RGB" and list(out.size) == entry.output_size
            assert all(side % 64 == 0 and 512 <= side <= 768 for side in out.size)
    got = entries(result)
    assert got["wide.jpg"].crop_box == [350.0, 0.0, 1250.0, 600.0]  # 3:2 centre crop of 1600×600
    assert got["tall.png"].output_size == [512, 768]
    assert got["square.webp"].sha256 == hashlib.sha256((src / "square.webp").read_bytes()).hexdigest()


def test_small_pictures_are_upscaled_with_a_warning_or_skipped(tmp_path):
    src = good_folder(tmp_path / "src", 1)
    make_image(src / "tiny.png", size=(300, 200))
    up = entries(run(src, tmp_path / "a"))["tiny.png"]
    assert up.status == "written" and up.upscaled and up.warnings[0].startswith("small: 300×200")
    skipped = run(src, tmp_path / "b", upscale=False)
    entry = entries(skipped)["tiny.png"]
    assert entry.status == "skipped" and "upscaling is off" in entry.reason
    assert not (skipped.folder / "tiny.png").exists()


def test_exact_duplicates_are_kept_once(tmp_path):
    src = good_folder(tmp_path / "src", 2)
    Image.open(src / "img0.png").save(src / "img0_copy.bmp")  # same pixels, other format
    result = run(src, tmp_path / "out", workers=2)
    entry = entries(result)["img0_copy.bmp"]
    assert (entry.status, entry.reason) == ("skipped", "exact duplicate of img0.png")
    assert sorted(p.name for p in result.folder.iterdir()) == ["img0.png", "img1.png"]


def test_colliding_stems_both_survive_and_captions_follow(tmp_path):
    src = tmp_path / "src"
    make_image(src / "cat.jpg", size=(800, 600), seed=1)
    make_image(src / "cat.PNG", size=(800, 600), seed=2)
    make_image(src / "ünïcode 猫.jpg", size=(800, 600), seed=3)
    (src / "cat.txt").write_text("a cat", encoding="utf-8")
    (src / "ünïcode 猫.caption").write_text("猫", encoding="utf-8")
    result = run(src, tmp_path / "out")
    names = sorted(p.name for p in result.folder.iterdir())
    assert names == ["cat_jpg.png", "cat_jpg.txt", "cat_png.png", "cat_png.txt", "ünïcode 猫.caption", "ünïcode 猫.png"]
    assert (result.folder / "cat_png.txt").read_text(encoding="utf-8") == "a cat"


def test_second_run_does_only_the_missing_work(tmp_path):
    src = good_folder(tmp_path / "src", 3)
    dst = tmp_path / "out"
    first = run(src, dst)
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.folder.iterdir()}
    make_image(src / "img1.png", size=(900, 600), seed=9)  # changed
    make_image(src / "new.png", size=(800, 800), seed=7)  # added
    os.utime(src / "img2.png")  # touched only
    second = run(src, dst)
    assert second.fresh == {"img1.png", "new.png"}
    assert second.reused == 2
    after = {p.name: p.stat().st_mtime_ns for p in second.folder.iterdir()}
    assert after["img0.png"] == mtimes["img0.png"] and after["img2.png"] == mtimes["img2.png"]
    assert after["img1.png"] != mtimes["img1.png"]
    with Image.open(second.folder / "img1.png") as out:
        assert out.size == (768, 512)  # 900×600 is 3:2 now
    assert second.folder.name == "375_clay" and not first.folder.exists()  # 4 pictures: renamed in place
    third = run(src, dst)
    assert third.fresh == set() and third.reused == 4


def test_changed_options_redo_everything(tmp_path):
    src = good_folder(tmp_path / "src", 2)
    run(src, tmp_path / "out")
    again = run(src, tmp_path / "out", max_side=512)
    assert again.fresh == {"img0.png", "img1.png"}
    assert all(e.output_size == [512, 512] for e in again.report.entries)


def test_user_edited_captions_are_never_overwritten(tmp_path):
    src = good_folder(tmp_path / "src", 2)
    (src / "img0.txt").write_text("original", encoding="utf-8")
    (src / "img1.txt").write_text("original", encoding="utf-8")
    first = run(src, tmp_path / "out")
    (first.folder / "img0.txt").write_text("claymation style, edited by hand", encoding="utf-8")
    (src / "img0.txt").write_text("changed at the source", encoding="utf-8")
    (src / "img1.txt").write_text("changed at the source", encoding="utf-8")
    os.utime(src / "img0.png", ns=(1, 1))  # force both pictures to be looked at again
    second = run(src, tmp_path / "out")
    assert (second.folder / "img0.txt").read_text(encoding="utf-8") == "claymation style, edited by hand"
    assert (second.folder / "img1.txt").read_text(encoding="utf-8") == "changed at the source"


def test_output_inside_src_is_never_read_back(tmp_path):
    src = good_folder(tmp_path / "src", 2)
    before = snapshot(src)
    result = run(src, src / "training")
    assert result.report.counts()["written"] == 2
    again = run(src, src / "training")
    assert {e.source for e in again.report.entries} == {"img0.png", "img1.png"}
    assert {k: v for k, v in snapshot(src).items() if not k.startswith("training/")} == before


def test_fixed_repeats_and_spaces_in_the_name(tmp_path):
    src = good_folder(tmp_path / "src", 2)
    result = prepare_folder(src, tmp_path / "out", "claymation style", PrepOptions(), repeats=12, progress=False)
    assert result.folder.name == "12_claymation style"
    assert result.report.repeats == 12


@pytest.mark.parametrize(
    "make_dst, message",
    [
        (lambda src, tmp: src, "is SRC itself"),
        (lambda src, tmp: (tmp / "file.txt", (tmp / "file.txt").write_text("x"))[0], "is a file"),
    ],
)
def test_usage_errors(tmp_path, make_dst, message):
    src = good_folder(tmp_path / "src", 1)
    with pytest.raises(UsageError, match=message):
        run(src, make_dst(src, tmp_path))


def test_a_journal_cut_mid_line_by_a_kill_is_read_and_continued(tmp_path):
    from lorasmith.prep.picture import Outcome
    from lorasmith.prep.report import JOURNAL_NAME, Journal, load_report

    journal = Journal(tmp_path, "/src", "x", {"crop": "center"})
    journal.add(Outcome("a.png", "written", output="a.png"))
    journal.close(delete=False)
    with open(tmp_path / JOURNAL_NAME, "ab") as handle:
        handle.write(b'{"source": "b.pn')  # the process died mid-line
    journal = Journal(tmp_path, "/src", "x", {"crop": "center"})  # the next run continues the same journal
    journal.add(Outcome("c.png", "written", output="c.png"))
    journal.close(delete=False)
    report = load_report(tmp_path)
    assert [e.source for e in report.entries] == ["a.png", "c.png"] and report.options == {"crop": "center"}
    Journal(tmp_path, "/src", "x", {"crop": "top"}).close(delete=False)  # another setup starts afresh
    assert load_report(tmp_path).entries == []

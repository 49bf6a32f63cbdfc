"""`prep-images` as a user runs it: a subprocess over the bundled example and over bad input (the README's whole
example, all three stages, is tests/test_learning.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, make_image
from test_prep_folder import snapshot

EXAMPLE = REPO / "datasets_example" / "raw"
BIN = Path(sys.executable).parent


def prep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "prep-images"), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_example_dataset(tmp_path):
    before = snapshot(EXAMPLE)
    done = prep(EXAMPLE, "--out", tmp_path, "--name", "claymation style", "--quiet")
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "137_claymation style"  # 11 pictures: ceil(1500 / 11)
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 11
    for png in pngs:
        with Image.open(png) as image:
            assert image.mode == "RGB"
            assert all(side % 64 == 0 and 512 <= side <= 768 for side in image.size), (png.name, image.size)
    assert (folder / "clay_blob_red.txt").read_text(encoding="utf-8") == "a red circle\n"
    assert (folder / "pâte_à_modeler.png").exists()
    with Image.open(folder / "clay_snail.png") as snail:
        assert snail.size == (576, 768)  # stored landscape, upright portrait after EXIF rotation
    with Image.open(folder / "clay_logo.png") as logo:
        assert logo.getpixel((2, 2)) == (255, 255, 255)  # transparency on white, not black
    report = json.loads((tmp_path / "prep_report.json").read_text(encoding="utf-8"))
    assert report["summary"] == {"written": 11, "skipped": 0, "failed": 0}
    assert report["folder"] == "137_claymation style" and report["repeats"] == 137
    assert "warning: clay_tiny.png: small: 400×300" in done.stderr
    assert done.stdout.strip().startswith("prep-images: 11 written (11 new, 0 up to date), 0 skipped, 0 failed")
    assert snapshot(EXAMPLE) == before
    again = prep(EXAMPLE, "--out", tmp_path, "--name", "claymation style", "--quiet")
    assert again.returncode == 0 and "11 written (0 new, 11 up to date)" in again.stdout


def test_a_failed_input_exits_1_and_names_the_file(tmp_path):
    src = tmp_path / "src"
    make_image(src / "ok.png", size=(600, 600))
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    done = prep(src, "--out", tmp_path / "out", "--name", "x", "--quiet")
    assert done.returncode == 1
    assert "error: broken.jpg: not a picture" in done.stderr
    assert "1 written (1 new, 0 up to date), 0 skipped, 1 failed" in done.stdout
    assert (tmp_path / "out" / "1500_x" / "ok.png").exists()


def test_strict_counts_skips_as_failures(tmp_path):
    src = tmp_path / "src"
    make_image(src / "ok.png", size=(600, 600))
    make_image(src / "tiny.png", size=(100, 100))
    lenient = prep(src, "--out", tmp_path / "a", "--name", "x", "--no-upscale", "--quiet")
    strict = prep(src, "--out", tmp_path / "b", "--name", "x", "--no-upscale", "--strict", "--quiet")
    assert (lenient.returncode, strict.returncode) == (0, 1)
    assert "skipped: tiny.png: small: 100×100 is below --min-side 512" in strict.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/nowhere", "--out", "{tmp}/o", "--name", "x"], "is not a folder"),
        (["{tmp}/src", "--out", "{tmp}/src", "--name", "x"], "is SRC itself"),
        (["{tmp}/src", "--out", "{tmp}/o", "--name", "  "], "NAME is empty"),
        (["{tmp}/src", "--out", "{tmp}/o", "--name", "x", "--min-side", "700", "--max-side", "760"], None),
        (["{tmp}/src", "--out", "{tmp}/o", "--name", "x", "--min-side", "710", "--max-side", "760"], "no multiple of 64"),
        (["{tmp}/src", "--out", "{tmp}/o", "--name", "x", "--repeats", "lots"], "expected 'auto' or a whole number"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, args, message):
    make_image(tmp_path / "src" / "a.png", size=(800, 800))
    done = prep(*[a.format(tmp=tmp_path) for a in args], "--quiet")
    if message is None:
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_dry_run_writes_nothing(tmp_path):
    done = prep(EXAMPLE, "--out", tmp_path / "out", "--name", "clay", "--dry-run")
    assert done.returncode == 0
    assert "clay_snail.JPG: 900×1200 → 576×768 as clay_snail.png" in done.stdout
    assert "repeats: 137 (auto: max(100, ceil(1500 / 11)))" in done.stdout
    assert not (tmp_path / "out").exists()


def test_help_lists_every_option_with_its_default_and_imports_no_torch():
    code = (
        "import sys, contextlib, io\n"
        "from lorasmith.prep.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "print(out.getvalue()); print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    text = done.stdout
    assert text.rstrip().endswith("NO-TORCH")
    for option, default in [("--min-side", "512"), ("--max-side", "768"), ("--crop", "center"),
                            ("--background", "white"), ("--repeats", "auto"), ("--max-pixels", "178956970")]:
        assert option in text
        assert f"(default: {default})" in " ".join(text.split())
    for flag in ("--no-upscale", "--dry-run", "--strict", "--workers", "--quiet", "--area N"):
        assert flag in text
    assert "anime/illustration 7-15" in text


def test_empty_src_is_a_usage_error(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "only.txt").write_text("a caption without a picture")
    done = prep(tmp_path / "src", "--out", tmp_path / "out", "--name", "x", "--quiet")
    assert done.returncode == 2 and "holds no files to prepare" in done.stderr
    assert not (tmp_path / "out").exists()


def test_area_mode_gives_sdxl_sizes(tmp_path):
    make_image(tmp_path / "src" / "wide.png", size=(1500, 1000))
    make_image(tmp_path / "src" / "square.png", size=(1100, 1100))
    done = prep(tmp_path / "src", "--out", tmp_path / "out", "--name", "x", "--area", "1024", "--quiet")
    assert done.returncode == 0, done.stderr
    sizes = {p.stem: Image.open(p).size for p in (tmp_path / "out").glob("*_x/*.png")}
    assert sizes == {"wide": (1216, 832), "square": (1024, 1024)}
    report = json.loads((tmp_path / "out" / "prep_report.json").read_text(encoding="utf-8"))
    assert report["options"]["area"] == 1024 and report["options"]["max_side"] == 2048

"""prep-images against a plain single-process Pillow loop on the same pictures, in one run.

Rounds are interleaved (baseline, prep, baseline, prep, ...) and medians reported, because shared machines
are noisy. Peak memory is the largest total RSS of each contender's whole process tree (workers included),
sampled every 10 ms.

    .venv/bin/python bench/prep_bench.py [--images 60] [--rounds 3] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import measure  # noqa: E402

BIN = Path(sys.executable).parent

SIZES = [(6000, 4000), (4000, 3000), (4032, 3024), (3000, 4000), (2400, 1600), (1600, 1200), (1200, 1600),
         (1024, 768), (900, 700), (2048, 2048)]


def draw(size: tuple[int, int], seed: int) -> Image.Image:
    """A photo-like picture: gradient, shapes and blur, so JPEG and PNG sizes are realistic."""
    rng = random.Random(seed)
    small = Image.linear_gradient("L").resize((size[0] // 8, size[1] // 8))
    image = Image.merge("RGB", (small, small.transpose(Image.Transpose.FLIP_TOP_BOTTOM), small)).resize(size)
    pen = ImageDraw.Draw(image)
    for _ in range(30):
        x, y, r = rng.randrange(size[0]), rng.randrange(size[1]), rng.randrange(20, max(21, size[0] // 6))
        pen.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    return image.filter(ImageFilter.GaussianBlur(2))


def make_dataset(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    for i in range(count):
        size = SIZES[i % len(SIZES)]
        image = draw(size, i)
        if i % 3 == 2:
            image.save(folder / f"p{i:03d}.png", compress_level=1)
        else:
            image.save(folder / f"p{i:03d}.jpg", quality=90)


def baseline(src: Path, dst: Path) -> None:
    """What a hand-written script does: open, convert, resize to cover, centre-crop, save PNG."""
    from lorasmith.common.sizing import choose_size

    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        tw, th = choose_size(*image.size)
        scale = max(tw / image.width, th / image.height)
        resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
        left, top = (resized.width - tw) // 2, (resized.height - th) // 2
        resized.crop((left, top, left + tw, top + th)).save(dst / f"{path.stem}.png")


def contenders(src: Path, out: Path, workers: int) -> dict[str, list[str]]:
    return {
        "baseline (Pillow loop, 1 process)": [sys.executable, __file__, "--child-baseline", str(src), str(out / "base")],
        f"prep-images --workers {workers}": [str(BIN / "prep-images"), str(src), "--out", str(out / "prep"),
                                             "--name", "bench", "--quiet", "--workers", str(workers)],
    }


def run_rounds(src: Path, work: Path, rounds: int, workers: int, count: int) -> dict[str, list[tuple[float, float]]]:
    results: dict[str, list[tuple[float, float]]] = {}
    for round_no in range(rounds):
        for name, command in contenders(src, work, workers).items():
            shutil.rmtree(work / "base", ignore_errors=True)
            shutil.rmtree(work / "prep", ignore_errors=True)
            seconds, peak, _ = measure(command)
            results.setdefault(name, []).append((seconds, peak))
            print(f"  round {round_no + 1}: {name}: {count / seconds:.1f} img/s, peak {peak:.0f} MiB", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child-baseline", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_baseline:
        baseline(Path(args.child_baseline[0]), Path(args.child_baseline[1]))
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"drawing {args.images} pictures ({len(SIZES)} sizes up to 6000×4000, JPEG and PNG)...", flush=True)
        make_dataset(root / "mixed", args.images)
        print(f"{os.cpu_count()} cores; {args.rounds} interleaved rounds")
        mixed = run_rounds(root / "mixed", root / "w1", args.rounds, args.workers, args.images)

        big = root / "big"
        big.mkdir()
        draw((8000, 6000), 99).save(big / "huge.jpg", quality=92)
        print("one 8000×6000 JPEG, 1 worker:")
        single = run_rounds(big, root / "w2", args.rounds, 1, 1)

    print("\nmedians")
    base_name, prep_name = list(mixed)
    base_s = statistics.median(s for s, _ in mixed[base_name])
    prep_s = statistics.median(s for s, _ in mixed[prep_name])
    for name, runs in mixed.items():
        seconds = statistics.median(s for s, _ in runs)
        print(f"  {name:36s} {args.images / seconds:6.1f} img/s   peak RSS {statistics.median(p for _, p in runs):6.0f} MiB")
    print(f"  speed-up: {base_s / prep_s:.2f}× (goal ≥ 1.8×)")
    for name, runs in single.items():
        print(f"  8000×6000 JPEG, {name:36s} peak RSS {statistics.median(p for _, p in runs):6.0f} MiB "
              f"in {statistics.median(s for s, _ in runs):.2f} s (goal < 1024 MiB)")


if __name__ == "__main__":
    main()

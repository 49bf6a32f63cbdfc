"""How the frozen base's storage and the training precision change memory, speed and the loss: the toy example
(presets/toy-clay.toml on the README's example dataset) for N steps as fp32, bf16 mixed precision, an fp8 base
computed in fp32, and an fp8 base computed in bf16. No samples, states or validation, so the training is all
that is measured. Rounds interleave; medians of s/step and peak RSS; the loss is the same in every round
(seeded), reported as the mean over all steps and over the last quarter.

    .venv/bin/python bench/precision_bench.py [--steps 100] [--rounds 2]

Needs the example's pictures: run `bash scripts/example.sh` (or the README's prep command) once first.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from measure import measure  # noqa: E402

BIN = Path(sys.executable).parent
VARIANTS = {
    "fp32": ["training.mixed_precision=no", "model.base_precision=auto"],
    "bf16": ["training.mixed_precision=bf16", "model.base_precision=auto"],
    "fp8 base, fp32 compute": ["training.mixed_precision=no", "model.base_precision=fp8"],
    "fp8 base, bf16 compute": ["training.mixed_precision=bf16", "model.base_precision=fp8"],
}


def run(name: str, steps: int, out: Path) -> tuple[float, float, list[float]]:
    """(s/step, peak RSS MiB, losses) of one training run of the toy preset."""
    overrides = [*VARIANTS[name], f"training.max_train_steps={steps}", f"output.output_dir={out}",
                 "sample.sample_prompts=", "sample.sample_at_first=false", "output.save_state=false",
                 "output.save_every_n_epochs=0", "dataset.validation_split=0", "output.log_tensorboard=false"]
    command = [str(BIN / "train-lora"), str(ROOT / "presets" / "toy-clay.toml"), "--quiet"]
    for item in overrides:
        command += ["--set", item]
    seconds, peak, _ = measure(command)
    with open(out / "toy-clay.logs" / "loss.csv", encoding="utf-8") as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    return seconds / steps, peak, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not any((ROOT / "out" / "example").glob("*_*/*.png")):
        raise SystemExit("no example pictures in out/example: run the README's example first")
    results: dict[str, list] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name in VARIANTS:
                out = Path(tmp) / f"{round_}-{name.replace(' ', '_').replace(',', '')}"
                results[name].append(run(name, args.steps, out))
                print(f"round {round_ + 1} {name}: {results[name][-1][0]:.3f} s/step", file=sys.stderr)
    print(f"toy example, {args.steps} steps, batch 8, 64 px, medians of {args.rounds} rounds (whole-job s/step "
          "includes loading and caching)")
    print(f"{'variant':<24} {'s/step':>8} {'peak RSS MiB':>13} {'mean loss':>10} {'last 25 %':>10}")
    for name, rows in results.items():
        losses = rows[0][2]
        tail = losses[-max(1, len(losses) // 4):]
        print(f"{name:<24} {statistics.median(r[0] for r in rows):>8.3f} {statistics.median(r[1] for r in rows):>13.0f} "
              f"{statistics.fmean(losses):>10.4f} {statistics.fmean(tail):>10.4f}")


if __name__ == "__main__":
    main()

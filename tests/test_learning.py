"""train-lora must teach: the README's main command (`scripts/example.sh`: prep, captions, 300 steps on the toy
base model, a sweep) gives a LoRA whose samples carry the clay style the base never drew, in its own samples,
in `lora generate`'s sweep and loaded the way users load it (diffusers' `load_lora_weights`).

Measured here: base style about 0, the example's LoRA about 0.62 (0.27 at weight 0.5), content accuracy 0.58.
The thresholds sit well below that, so only a change that breaks learning fails here: a wrong alpha, a LoRA
that never reaches the UNet, a frozen adapter, a wrong noise target. Not a timing test.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO

sys.path.insert(0, str(REPO))
from toy import scores  # noqa: E402

BASE = REPO / "toy" / "base"
pytestmark = pytest.mark.skipif(not (REPO / ".venv" / "bin" / "prep-images").exists(),
                                reason="README's .venv not set up")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The README's command, run once: its output folder and the completed process."""
    out = tmp_path_factory.mktemp("example")
    done = subprocess.run(["bash", str(REPO / "scripts" / "example.sh")], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "LORASMITH_EXAMPLE_OUT": str(out)})
    assert done.returncode == 0, done.stderr
    return out, done


def styles(lora, weight: float = 1.0) -> tuple[float, float]:
    """(mean style score, content accuracy) of one sample per colour × shape with the trigger phrase."""
    from toy.sampling import pipeline, sample

    samples = sample(pipeline(BASE, lora, weight), style=True, seeds=[0], steps=15)
    return (sum(scores.style_score(im) for im, *_ in samples) / len(samples),
            scores.content_accuracy([(im, c, s) for im, c, s, _ in samples]))


def test_readme_example_command(example):
    """All three stages run and the LoRA visibly learns: its last samples with the trigger phrase carry the clay
    shading that the step-0 samples of the toy base model lack."""
    out, done = example
    folder = out / "137_claymation style"
    assert len(list(folder.glob("*.png"))) == 11
    captions = {p.stem: p.read_text(encoding="utf-8") for p in folder.glob("*.txt")}
    assert len(captions) == 11 and all(c.startswith("claymation style, ") for c in captions.values())
    assert captions["clay_blob_red"] == "claymation style, a red circle\n"  # the sidecar, kept
    assert captions["clay_scan"] != "claymation style, a blue triangle\n"  # written by the (random) captioner
    lora = out / "lora" / "toy-clay.safetensors"
    assert lora.exists() and "train-lora: 300 steps" in done.stdout
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["modelspec.trigger_phrase"] == "claymation style"
        assert any(k.startswith("lora_unet_") for k in f.keys())

    samples = out / "lora" / "toy-clay.samples"
    steps = sorted({p.name.split("-")[1] for p in samples.glob("e*-s*-00.png")})
    first, last = steps[0], steps[-1]
    assert (first, last) == ("s00000000", "s00000300")

    def style(step: str) -> float:  # prompts 0-3 carry the trigger phrase
        return sum(scores.style_score(Image.open(next(samples.glob(f"e*-{step}-{i:02d}.png")))) for i in range(4)) / 4

    before, after = style(first), style(last)
    assert before < 0.15 and after > before + 0.15, (before, after)
    assert (out / "lora" / "toy-clay.report.html").is_file()
    # The sweep: rows = the saved epochs then the final file, columns = weights 0 … 1; through `lora generate`
    # the final LoRA at weight 1 carries the clay look that weight 0 (the base model) lacks.
    from lorasmith.use.grid import cell_box

    (sweep,) = (out / "sweep").glob("sweep-*.png")
    rows = [p.stem for p in sorted((out / "lora").glob("toy-clay*.safetensors"))]  # as the glob expands
    assert rows[-1] == "toy-clay" and len(rows) >= 2
    columns = [f"weight {w:g}" for w in (0, 0.25, 0.5, 0.75, 1)]
    grid = Image.open(sweep)
    assert grid.size == tuple(x + 6 for x in cell_box(len(rows) - 1, 4, rows, columns)[2:])

    def cell(column: int) -> float:
        return scores.style_score(grid.crop(cell_box(len(rows) - 1, column, rows, columns)).resize((64, 64),
                                                                                                   Image.LANCZOS))

    assert cell(4) > cell(0) + 0.15, (cell(0), cell(4))


def test_the_example_lora_teaches_the_style_through_diffusers(example):
    out, _ = example
    lora = out / "lora" / "toy-clay.safetensors"
    base_style, base_content = styles(None)
    lora_style, lora_content = styles(lora)
    half_style, _ = styles(lora, 0.5)
    assert base_style < 0.1, base_style  # the base model draws flat shapes, trigger or not
    assert base_content >= 0.4, base_content
    assert lora_style > base_style + 0.15, (base_style, lora_style)
    assert lora_content >= 0.25, lora_content  # still shapes of the prompted colours, not one learned blob
    assert base_style < half_style < lora_style  # the strength slider works in between


def test_samples_during_training_have_the_prompted_size_with_a_small_vae(example):
    """The toy VAE has three blocks (4 pixels per latent, not SD's 8): sample latents follow its config."""
    out, _ = example
    grids = sorted((out / "lora" / "toy-clay.samples").glob("*-00.png"))
    assert len(grids) == 4  # before training and every 100 steps
    for path in grids:
        with Image.open(path) as image:
            assert image.size == (64, 64)

"""Pure parts of a training run's side work: Kohya prompt files, states on disk, the validation split, the report."""

import errno
import json
import os
import re
from pathlib import Path

import pytest

from lorasmith.common.prompts import Prompt, parse_line, parse_prompts
from lorasmith.train.report import ReportData, average_window, curve_svg, moving_average, render
from lorasmith.train.state import (SaveError, StateError, describe_changes, is_complete, latest, read_state,
                                   states, storage_error, write_state)
from lorasmith.train.validation import split_validation


@pytest.mark.parametrize(
    "line, expected",
    [
        ("a cat", Prompt("a cat")),
        ("  a cat on a mat  ", Prompt("a cat on a mat")),
        ("a cat --n low quality, blurry --w 768 --h 512 --d 42 --l 5.5 --s 20",
         Prompt("a cat", "low quality, blurry", 768, 512, 42, 5.5, 20)),
        ("a cat  --w   640   --h 448", Prompt("a cat", width=640, height=448)),  # odd spacing
        ("a cat\t--d 7", Prompt("a cat", seed=7)),
        ("a cat --N blurry --W 576", Prompt("a cat", "blurry", width=576)),  # Kohya matches case-insensitively
        ("a cat --s 5000", Prompt("a cat", steps=1000)),  # Kohya's clamp to 1..1000
        ("a cat --s 0", Prompt("a cat", steps=1)),
        ("a cat --ss euler_a --s 12", Prompt("a cat", steps=12, sampler="euler_a")),
        ("clay--style figure", Prompt("clay--style figure")),  # `--` inside a word is not an option
        ("a cat --n ", Prompt("a cat")),  # an empty option is reported, the prompt kept
    ],
)
def test_prompt_lines(line, expected):
    prompt, _ = parse_line(line)
    assert prompt == expected


@pytest.mark.parametrize(
    "line, problem",
    [("a cat --x 3", "unknown option --x 3"), ("a cat --w wide", "--w wide: not a number"),
     ("a cat --w 500", "--w 500: sizes must be multiples of 8 from 64"), ("--w 512 --h 512", "no prompt before")],
)
def test_prompt_line_problems(line, problem):
    prompt, problems = parse_line(line)
    assert any(p.startswith(problem) for p in problems), problems


def test_prompt_file_skips_comments_and_blank_lines_and_names_the_line():
    text = "# a comment\n\n   # indented comment\nfirst --w 512\nsecond --q 1\n--s 3\n"
    prompts, warnings = parse_prompts(text, "prompts.txt")
    assert [p.prompt for p in prompts] == ["first", "second"]
    assert warnings == ["prompts.txt:5: unknown option --q 1", "prompts.txt:6: no prompt before the options"]


# -- states --------------------------------------------------------------------------------------------
def _files(tag: str, steps: int) -> dict[str, bytes]:
    """A state's files after `steps` steps (its history holds one loss a step)."""
    from safetensors.torch import save
    import io
    import torch

    buffer = io.BytesIO()
    torch.save({"optimizer": {"lr": 1.0}, "rng": [(1, 2)], "tag": tag}, buffer)
    loss = [[n, 1, 0.5, 1e-4] for n in range(1, steps + 1)]
    return {"adapters.safetensors": save({"w": torch.ones(2)}), "training.pt": buffer.getvalue(),
            "history.json": json.dumps({"loss": loss, "tag": tag}).encode()}


def test_states_are_complete_newest_first_and_pruned(tmp_path):
    root = tmp_path / "run.state"
    for step in (2, 4, 6):
        write_state(root, step, _files(str(step), step), {"position": [1, step]}, keep=2, run="aaaa")
    assert [(f.step, f.complete, f.run) for f in states(root)] == [(4, True, "aaaa"), (6, True, "aaaa")]
    assert latest(root).name == "step-00000006-aaaa"
    loaded = read_state(latest(root))
    assert loaded.manifest["position"] == [1, 6] and loaded.history["tag"] == "6"
    assert not list(root.glob(".step-*"))  # no temporary folder left


def test_pruning_never_touches_another_run_and_the_newest_written_wins(tmp_path):
    root = tmp_path / "run.state"
    for step in (30, 40):
        write_state(root, step, _files(str(step), step), {"position": [1, step]}, keep=2, run="01d0")
    for step in (1, 2, 3):  # a fresh run: its steps sort below the old run's, yet it is the newest
        write_state(root, step, _files(str(step), step), {"position": [1, step]}, keep=2, run="11ee")
    assert sorted((f.run, f.step) for f in states(root)) == [("01d0", 30), ("01d0", 40), ("11ee", 2), ("11ee", 3)]
    assert latest(root).name == "step-00000003-11ee" and latest(root, "01d0").name == "step-00000040-01d0"


def test_a_torn_state_is_ignored_and_a_damaged_one_refused(tmp_path):
    root = tmp_path / "run.state"
    write_state(root, 1, _files("3", 1), {"position": [1, 1]}, keep=5, run="ab")
    newest = write_state(root, 2, _files("5", 2), {"position": [1, 2]}, keep=5, run="ab")
    (newest / "manifest.json").unlink()  # killed before the manifest was written
    assert not is_complete(newest) and latest(root).name == "step-00000001-ab"
    with pytest.raises(StateError, match="not a complete training state"):
        read_state(newest)
    short = root / "step-00000001-ab" / "training.pt"
    data = short.read_bytes()
    short.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(StateError, match="damaged"):
        read_state(root / "step-00000001-ab")


@pytest.mark.parametrize("edit, message", [
    ({"step": 2}, "says step 2, but its folder name says 1 and its data position (epoch 1, batch 1) means step 1"),
    ({"position": [2, 1], "per_process": 3}, "means step 4"),
    ({"position": "end"}, "damaged or was edited by hand"),
])
def test_a_hand_edited_manifest_is_refused(tmp_path, edit, message):
    root = tmp_path / "run.state"
    folder = write_state(root, 1, _files("1", 1), {"position": [1, 1], "per_process": 3, "accumulation": 1}, keep=2,
                         run="ab")
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    (folder / "manifest.json").write_text(json.dumps({**manifest, **edit}), encoding="utf-8")
    with pytest.raises(StateError, match=re.escape(message)):
        read_state(folder)


def test_disk_full_keeps_the_previous_state_and_names_the_path(tmp_path, monkeypatch):
    root = tmp_path / "run.state"
    write_state(root, 1, _files("1", 1), {"position": [1, 1]}, keep=2, run="ab")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SaveError) as caught:
        write_state(root, 2, _files("2", 2), {"position": [1, 2]}, keep=2, run="ab")
    message = str(caught.value)
    assert f"the disk holding {root}" in message and "is full" in message and "adapters.safetensors" in message
    assert f"the previous state {root / 'step-00000001-ab'} is intact" in message
    monkeypatch.undo()
    assert [f.step for f in states(root)] == [1] and not list(root.glob(".step-*"))
    assert read_state(root / "step-00000001-ab").history["tag"] == "1"


def test_storage_error_for_other_failures(tmp_path):
    error = storage_error(OSError(errno.EACCES, "Permission denied"), tmp_path / "x" / "lora.safetensors", None)
    assert error.errno == errno.EACCES
    assert str(error).startswith(f"could not write {tmp_path / 'x' / 'lora.safetensors'}: "
                                 "Permission denied; no earlier state was touched")


def test_describe_changes_lists_preset_keys_and_pictures():
    old_cfg = {"optimizer.learning_rate": 1e-4, "training.seed": 42}
    new_cfg = {"optimizer.learning_rate": 2e-4, "training.seed": 42}
    old_data = {"/d/a.png": "1 c 10 train", "/d/b.png": "2 c 10 train"}
    new_data = {"/d/a.png": "1 c 10 train", "/d/b.png": "9 c 10 train", "/d/c.png": "3 c 10 train"}
    assert describe_changes(old_cfg, new_cfg, old_data, new_data) == [
        "preset optimizer.learning_rate: 0.0001 then, 0.0002 now",
        "dataset: 1 picture(s) added: c.png",
        "dataset: 1 picture(s) changed (picture, caption, repeats or held out): b.png",
    ]
    assert describe_changes(old_cfg, old_cfg, old_data, old_data) == []


# -- validation split ----------------------------------------------------------------------------------
class _Item:
    def __init__(self, name):
        self.image = Path(name)


@pytest.mark.parametrize("count, fraction, held", [(10, 0.1, 1), (10, 0.25, 2), (3, 0.01, 1), (2, 0.9, 1), (5, 0.0, 0)])
def test_validation_split_sizes(count, fraction, held):
    items = [_Item(f"{i:02d}.png") for i in range(count)]
    train, val, warning = split_validation(items, fraction, seed=1)
    assert len(val) == held and len(train) == count - held and warning is None
    assert {i.image for i in train} | {i.image for i in val} == {i.image for i in items}


def test_validation_split_depends_on_names_and_seed_only():
    items = [_Item(f"{i:02d}.png") for i in range(20)]
    a = split_validation(items, 0.2, 7)[1]
    b = split_validation(list(reversed(items)), 0.2, 7)[1]
    assert [i.image for i in a] == [i.image for i in b]
    assert split_validation(items[:1], 0.5, 7)[2].startswith("validation_split = 0.5 needs at least 2 pictures")


# -- report --------------------------------------------------------------------------------------------
def test_moving_average_matches_a_direct_computation():
    values = [1.0, 3.0, 2.0, 6.0, 4.0]
    assert moving_average(values, 2) == [1.0, 2.0, 2.5, 4.0, 5.0]
    assert moving_average(values, 10) == [1.0, 2.0, 2.0, 3.0, 3.2]
    assert [average_window(n) for n in (10, 400, 10_000)] == [5, 20, 100]


def test_curve_places_the_band_and_the_points():
    loss = [[s, 1 + (s > 2), 0.2 - 0.01 * s, 1e-4] for s in range(1, 5)]
    svg = curve_svg(loss, [[2, 1, 0.15]], total_steps=4, band=(0.08, 0.10), band_family="SD1.x", width=456, height=256)
    # plot area: x from 56 to 440 for steps 0..4; y from 16 to 216 for high..0, where high is 1.1 × the
    # 98th percentile of the five values (0.15 … 0.19, index int(0.98 × 4) = 3: 0.18), so one spike cannot flatten the rest
    high = 0.18 * 1.1
    assert f'y="{16 + 200 * (1 - 0.10 / high):.1f}"' in svg  # the band's top edge at 0.10
    assert f'<circle cx="{56 + 384 * 2 / 4:.1f}" cy="{16 + 200 * (1 - 0.15 / high):.1f}"' in svg
    assert svg.count("<polyline") == 3 and ">e1</text>" in svg and ">e2</text>" in svg
    assert "healthy for SD1.x: 0.08–0.10" in svg
    bare = curve_svg(loss, [[2, 1, 0.15]], total_steps=4, width=456, height=256)
    assert 'class="band"' not in bare and "healthy" not in bare
    assert f'<circle cx="{56 + 384 * 2 / 4:.1f}" cy="{16 + 200 * (1 - 0.15 / high):.1f}"' in bare  # same scale


def _page(band):
    loss = [[1, 1, 0.2, 1e-4], [2, 1, 0.2, 1e-4], [3, 2, 0.09, 1e-4], [4, 2, 0.09, 1e-4]]
    return render(ReportData("<x>", "finished", "a = '<b>'", ["plan"], ["data"], loss, [[2, 1, 0.3]], 4,
                             {"load": 1.0}, [("x.safetensors", 2**20)], [("epoch 1", 1, "data:image/jpeg;base64,AA==")],
                             {2: "x.safetensors"}, band, "SD1.x" if band else ""))


def test_report_marks_in_band_epochs_and_escapes_text():
    page = _page((0.08, 0.10))
    assert "<title>&lt;x&gt;</title>" in page and "a = &#x27;&lt;b&gt;&#x27;" in page
    assert '<tr class="in-band"><td>2</td><td>0.0900</td><td></td><td>x.safetensors</td>' in page
    assert '<tr class=""><td>1</td><td>0.2000</td><td>0.3000</td>' in page
    assert 'src="data:image/jpeg;base64,AA=="' in page and "1.00 MiB" in page
    assert '<rect class="band"' in page and "0.08–0.10: the band SD1.x LoRA guides call healthy" in page


def test_report_without_a_band_draws_and_marks_none():
    page = _page(None)
    assert '<tr class=""><td>2</td><td>0.0900</td><td></td><td>x.safetensors</td>' in page  # 0.09, yet unmarked
    assert 'class="in-band"' not in page and 'class="band"' not in page and "guides call healthy" not in page
    assert "No healthy loss band is published for this base, so no epoch is marked." in page


@pytest.mark.parametrize("family, width, layers, band", [
    ("sd1", 768, 12, (0.08, 0.10)),  # CLIP-L: SD1.x as published
    ("sd1", 32, 3, None),  # the tiny test model
    ("sd1", 64, 2, None),  # the toy base
    ("sd2", 1024, 23, None),  # OpenCLIP-H: no published band (epsilon or v-prediction)
    ("sdxl", 768, 12, None),
])
def test_the_healthy_band_comes_from_the_family_of_a_public_base(family, width, layers, band):
    from transformers import CLIPTextConfig

    from lorasmith.models.families import family_named

    config = CLIPTextConfig(hidden_size=width, num_hidden_layers=layers)
    assert family_named(family).healthy_band(config) == band


@pytest.mark.parametrize("precision, first", [("fp16", 'fp16 overflow: set training.mixed_precision = "bf16"'),
                                              ("no", "a learning rate too high (optimizer.learning_rate = 0.0001")])
def test_non_finite_loss_names_the_step_and_the_likely_cause_first(precision, first):
    from lorasmith.train.config import Config
    from lorasmith.train.events import NonFiniteLoss

    config = Config()
    config.training.mixed_precision = precision
    message = str(NonFiniteLoss(13, float("inf"), config))
    assert message.startswith(f"the loss became inf at step 13. Likely causes: {first}")
    assert ("fp16" in message) == (precision == "fp16")


@pytest.mark.parametrize("layers, adapted", [(None, [0, 1, 2]), (2, [0, 1]), (1, [0])])
def test_text_adapters_stop_at_the_layer_whose_output_is_used(layers, adapted):
    """clip_skip 2 uses the penultimate layer: the last one would never get a gradient, so it gets no adapter."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorasmith.train.network import add_text_lora, lora_layers

    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=99, hidden_size=8, intermediate_size=12, num_hidden_layers=3,
                                           num_attention_heads=2, max_position_embeddings=77))
    add_text_lora(encoder, 2, 2.0, layers=layers)
    found = sorted({int(path.split("layers.")[1].split(".")[0]) for path in lora_layers(encoder)})
    assert found == adapted and len(lora_layers(encoder)) == 6 * len(adapted)

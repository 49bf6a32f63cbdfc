"""`lora generate`, `merge`, `resize`, `info` as a user runs them: pictures, their parameters, grids, reruns,
bad input; and the pure parts (LoRA arguments, tags, sizes) table by table."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import REPO
from loras import attention_and_text, random_modules, write_kohya
from lorasmith.models.base import load_components
from lorasmith.common.prompts import Prompt
from lorasmith.use.apply import layer_table
from lorasmith.use.cli import main
from lorasmith.use.jobs import JobError, fit_size, parse_lora_arg, resolve_tag, split_lora_tags

BIN = Path(sys.executable).parent
TOY = REPO / "toy" / "base"


@pytest.mark.parametrize("text, expected", [
    ("clay.safetensors", ("clay.safetensors", 1.0)),
    ("clay.safetensors:0.8", ("clay.safetensors", 0.8)),
    ("clay.safetensors:-1.5", ("clay.safetensors", -1.5)),
    ("out/clay-*.safetensors:.5", ("out/clay-*.safetensors", 0.5)),
    ("C:/loras/clay.safetensors", ("C:/loras/clay.safetensors", 1.0)),  # a drive letter is not a weight
    ("clay.safetensors:1e-1", ("clay.safetensors", 0.1)),
])
def test_parse_lora_arg(text, expected):
    assert parse_lora_arg(text) == expected


@pytest.mark.parametrize("prompt, text, tags", [
    ("claymation style, a fox <lora:clay:0.8>", "claymation style, a fox", [("clay", 0.8)]),
    ("<lora:clay> a fox", "a fox", [("clay", 1.0)]),
    ("a, <lora:a:-1>, b <LyCo:c:1.2:0.5>", "a, b", [("a", -1.0), ("c", 1.2)]),
    ("(a fox:1.2)", "(a fox:1.2)", []),
])
def test_split_lora_tags(prompt, text, tags):
    assert split_lora_tags(prompt) == (text, tags)


def test_a_tag_weight_that_is_not_a_number_and_an_unknown_name_are_named(tmp_path):
    with pytest.raises(JobError, match=r"<lora:clay:strong>: weight 'strong' is not a number"):
        split_lora_tags("a fox <lora:clay:strong>")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "clay.safetensors").write_bytes(b"")
    assert resolve_tag("clay", [tmp_path]) == tmp_path / "sub" / "clay.safetensors"
    with pytest.raises(JobError, match=r"<lora:fox> in the prompt names no file: looked for fox.safetensors in "):
        resolve_tag("fox", [tmp_path])


@pytest.mark.parametrize("size, box, expected", [
    ((1000, 500), (512, 512), (728, 360)),
    ((500, 1000), (512, 512), (360, 728)),
    ((64, 64), (64, 64), (64, 64)),
    ((300, 200), (64, 64), (80, 56)),
])
def test_fit_size_keeps_the_aspect_at_about_the_area(size, box, expected):
    assert fit_size(size, *box) == expected
    w, h = expected
    assert w % 8 == 0 and h % 8 == 0


def parse_parameters(text: str) -> dict:
    """A1111's reading of the `parameters` chunk: prompt lines, `Negative prompt:`, then `Key: value` pairs."""
    *head, last = text.strip().split("\n")
    body = "\n".join(head)
    prompt, _, negative = body.partition("\nNegative prompt: ")
    if body.startswith("Negative prompt: "):
        prompt, negative = "", body[len("Negative prompt: "):]
    pairs = dict(re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', last))
    return {"prompt": prompt, "negative": negative, **{k: v.strip('"') for k, v in pairs.items()}}


@pytest.fixture(scope="module")
def loras(tiny_sd, tmp_path_factory):
    parts = load_components(str(tiny_sd), ("text_encoder", "unet"))
    table = layer_table(parts.unet, parts.text_encoder, aliases=False)
    root = tmp_path_factory.mktemp("gen-loras")
    write_kohya(root / "clay.safetensors", random_modules(table, 1, 4, attention_and_text, 0.5), 2.0)
    write_kohya(root / "ink.safetensors", random_modules(table, 2, 2, lambda k: "attn" in k, 0.5), 1.0)
    return root


def test_generate_writes_pictures_with_their_parameters_and_reruns_only_what_is_missing(tiny_sd, loras, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\n(claymation style:1.3), a fox <lora:ink:0.5> --n blurry --s 3\n"
                       "a cat, [plain] --w 128 --h 64 --d 42 --l 5\n", encoding="utf-8")
    args = ["generate", "--model", str(tiny_sd), "--lora", f"{loras / 'clay.safetensors'}:0.8", "--prompts", str(prompts),
            "--w", "64", "--h", "64", "--steps", "2", "--n", "2", "--seed", "7", "--out", str(tmp_path / "out"),
            "--sampler", "ddim", "--quiet"]
    run = subprocess.run([BIN / "lora", *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    pictures = sorted((tmp_path / "out").glob("0*.png"))
    assert len(pictures) == 4 and "4 picture(s) written, 0 already there" in run.stdout
    by_seed = {}
    for path in pictures:
        image = Image.open(path)
        info = parse_parameters(image.text["parameters"])
        by_seed[int(info["Seed"])] = (image.size, info)
    assert sorted(by_seed) == [7, 8, 42, 43]  # --d sets the first seed of its line
    size, fox = by_seed[7]
    assert size == (64, 64) and fox["Size"] == "64x64" and fox["Steps"] == "3" and fox["negative"] == "blurry"
    assert fox["prompt"] == "(claymation style:1.3), a fox <lora:clay:0.8> <lora:ink:0.5>"
    assert fox["Sampler"] == "DDIM" and fox["CFG scale"] == "7.5" and len(fox["Model hash"]) == 10
    assert re.fullmatch(r"clay: [0-9a-f]{12}, ink: [0-9a-f]{12}", fox["Lora hashes"])
    size, cat = by_seed[42]
    assert size == (128, 64) and cat["CFG scale"] == "5" and cat["prompt"] == "a cat, [plain] <lora:clay:0.8>"
    assert "Negative prompt" not in Image.open(pictures[-1]).text["parameters"] or cat["negative"] == ""
    assert len(list((tmp_path / "out").glob("sheet-*.png"))) == 1
    assert main(args) == 0  # the same call again: nothing to draw
    assert sorted((tmp_path / "out").glob("0*.png")) == pictures


def test_weight_zero_is_the_base_model_and_img2img_ends_meet(loras):
    """On the toy base (a VAE that reconstructs): weight 0 gives the base model's pixels exactly; strength 0
    gives the picture back through the VAE, strength 1 the text-to-image picture of the same seed."""
    from lorasmith.lorafile.read import read_lora
    from lorasmith.use.render import Renderer

    toy = load_components(str(TOY), ("text_encoder", "unet"))
    table = layer_table(toy.unet, toy.text_encoder, aliases=False)
    write_kohya(loras / "toy.safetensors", random_modules(table, 4, 4, attention_and_text, 0.5), 4.0)
    renderer = Renderer(str(TOY), {"toy": read_lora(loras / "toy.safetensors")}, "cpu")
    prompt = Prompt("claymation style, a red circle", width=64, height=64, steps=8)
    base = np.asarray(renderer.draw(prompt, 3, {}, "ddim"))
    ancestral = [np.asarray(renderer.draw(prompt, 3, {}, "euler_a")) for _ in range(2)]
    assert np.array_equal(*ancestral)  # per-step noise comes from the seed too
    assert np.array_equal(np.asarray(renderer.draw(prompt, 3, {"toy": 0.0}, "ddim")), base)
    plus, minus = (np.asarray(renderer.draw(prompt, 3, {"toy": w}, "ddim")).astype(int) for w in (1.0, -1.0))
    assert np.abs(plus - base).mean() > 2 and np.abs(minus - base).mean() > 2 and np.abs(plus - minus).mean() > 2
    from toy.world import pictures

    picture = pictures(5, 1)[0][0]
    source = np.asarray(picture).astype(int)
    kept = np.asarray(renderer.draw(prompt, 3, {}, "ddim", picture, 0.0)).astype(int)
    assert np.abs(kept - source).mean() < 6  # the VAE's own round trip
    half = np.asarray(renderer.draw(prompt, 3, {}, "ddim", picture, 0.5)).astype(int)
    ignored = np.asarray(renderer.draw(prompt, 3, {}, "ddim", picture, 1.0))
    assert np.array_equal(ignored, base)
    assert np.abs(kept - source).mean() < np.abs(half - source).mean() < np.abs(base.astype(int) - source).mean()


def test_sweep_is_one_grid_of_files_by_weights_with_the_base_in_column_zero(tiny_sd, loras, tmp_path, capsys):
    from lorasmith.use.grid import cell_box

    args = ["generate", "--model", str(tiny_sd), "--lora", str(loras / "[ci]*.safetensors"), "--prompt", "a fox",
            "--w", "64", "--h", "64", "--steps", "2", "--seed", "1", "--sweep", "--weights", "0,0.5,1",
            "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    (grid_path,) = tmp_path.glob("sweep-*.png")
    assert main(args) == 0 and "0 sweep grid(s) written, 1 already there" in capsys.readouterr().out
    assert main([*args[:-4], "0,1", *args[-3:]]) == 0 and len(list(tmp_path.glob("sweep-*.png"))) == 2
    grid = Image.open(grid_path)
    rows, columns = ["clay", "ink"], ["weight 0", "weight 0.5", "weight 1"]
    right, bottom = cell_box(1, 2, rows, columns)[2:]
    assert grid.size == (right + 6, bottom + 6)
    cells = [[np.asarray(grid.crop(cell_box(r, c, rows, columns))) for c in range(3)] for r in range(2)]
    assert np.array_equal(cells[0][0], cells[1][0])  # the base model, the same in every row
    assert not np.array_equal(cells[0][2], cells[1][2])  # each row its own LoRA
    assert not np.array_equal(cells[0][0], cells[0][2])


def test_img2img_over_a_folder_with_tags_keeps_names_and_reports_a_bad_picture(tiny_sd, loras, tmp_path, capsys):
    from test_wd14 import build_tagger

    tagger = build_tagger(tmp_path / "wd14")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (80, 60), (255, 0, 0)).save(photos / "red barn.png")
    Image.new("RGB", (60, 80), (0, 0, 255)).save(photos / "lake.jpg")
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "out"
    code = main(["generate", "--model", str(tiny_sd), "--lora", str(loras / "clay.safetensors"), "--init-image",
                 str(photos), "--strength", "0.5", "--tags", "--tagger", str(tagger), "--prompt", "(claymation style:2)",
                 "--w", "64", "--h", "64", "--steps", "2", "--seed", "3", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 1 and "broken.png" in captured.err and "2 picture(s) written" in captured.out
    made = {p.name.split("-")[0]: Image.open(p) for p in out.glob("*.png") if not p.name.startswith("sheet")}
    assert set(made) == {"red barn", "lake"}
    assert made["red barn"].size == (72, 56) and made["lake"].size == (56, 72)  # aspect kept at about 64×64
    red, lake = (parse_parameters(made[k].text["parameters"]) for k in ("red barn", "lake"))
    assert red["prompt"].startswith("(claymation style:2), red theme, ") and "red theme" not in lake["prompt"]
    assert lake["prompt"].startswith("(claymation style:2), hatsune miku, blue background, ")
    assert red["Denoising strength"] == "0.5"


def test_a_lora_for_another_model_is_one_line_and_exit_2(tiny_sd, tmp_path):
    path = write_kohya(tmp_path / "xl.safetensors", {"lora_unet_input_blocks_4_1_proj_in": (torch.zeros(4, 640),
                                                                                         torch.zeros(640, 4))},
                       metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    run = subprocess.run([BIN / "lora", "generate", "--model", str(tiny_sd), "--lora", str(path), "--prompt", "a",
                          "--w", "64", "--h", "64", "--steps", "1", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.startswith("lora:")]
    assert lines == ["lora: error: xl.safetensors does not fit this base model: 1 of 1 modules name no layer in it "
                     "(e.g. lora_unet_input_blocks_4_1_proj_in); the file was made for SDXL"]
    assert not list((tmp_path / "out").glob("*.png"))


def test_resize_merge_and_info_from_the_command_line(tiny_sd, loras, tmp_path, capsys):
    clay = loras / "clay.safetensors"
    assert main(["resize", str(clay), "--rank", "2", "--out", str(tmp_path / "clay-r2.safetensors")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\d+ modules, rank 2; ΔW kept \(Frobenius\): mean \d+\.\d\d%", out)
    with safe_open(str(tmp_path / "clay-r2.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
        assert handle.get_tensor(next(k for k in handle.keys() if k.endswith("lora_down.weight"))).shape[0] == 2
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "1"  # alpha/rank kept at 2/4
    assert main(["resize", str(clay), "--rank", "4", "--out", str(clay)]) == 2  # never over the original
    assert "originals are never overwritten" in capsys.readouterr().err
    assert main(["merge", "--lora", f"{clay}:0.5", "--lora", str(loras / "ink.safetensors"), "--out",
                 str(tmp_path / "both.safetensors")]) == 0
    assert "50 modules, rank 4–6 (ranks concatenated" in capsys.readouterr().out
    assert main(["info", str(clay), str(tmp_path / "both.safetensors"), "--model", str(tiny_sd)]) == 0
    out = capsys.readouterr().out
    assert "clay.safetensors" in out and "base model family: SD1.x" in out and "health: ok" in out
    assert re.search(r"text encoder\s+rank 4 alpha 2", out) and "up_blocks.1" in out
    sick = write_kohya(tmp_path / "sick.safetensors",
                       {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
                        (torch.full((4, 32), float("nan")), torch.zeros(32, 4))}, alpha=None)
    assert main(["info", str(sick), "--model", str(tiny_sd)]) == 1
    out = capsys.readouterr().out
    assert "NaN or infinite" in out and "all-zero up weight (untrained" in out and "no .alpha" in out


def test_lora_help_lists_every_subcommand_and_option_defaults():
    run = subprocess.run([BIN / "lora", "generate", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0
    for option in ("--lora FILE[:WEIGHT]", "--strength", "(default: 0.5)", "--sweep", "(default: euler_a)",
                   "--tags", "--init-image"):
        assert option in run.stdout, option
    top = subprocess.run([BIN / "lora", "--help"], capture_output=True, text=True, timeout=60).stdout
    assert all(name in top for name in ("generate", "merge", "resize", "info"))

"""`lora` against outputs that would replace inputs, tags that leave their folder, absurd numbers, damaged files,
read-only and full disks: one sentence, a meaningful exit code, nothing lost and no NaN picture."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import REPO
from hostile import check, check_result, lora_main, run, snapshot, tiny_disk, unprivileged
from loras import attention_and_text, random_modules, write_kohya
from lorasmith.models.base import load_components
from lorasmith.use.apply import layer_table
from lorasmith.use.jobs import JobError, resolve_tag

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture(scope="module")
def plain(tiny_sd):
    parts = load_components(str(tiny_sd), ("text_encoder", "unet"))
    return layer_table(parts.unet, parts.text_encoder, aliases=False)


@pytest.fixture(scope="module")
def loras(plain, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-loras")
    write_kohya(root / "a.safetensors", random_modules(plain, 1, 4, attention_and_text), 2.0)
    write_kohya(root / "b.safetensors", random_modules(plain, 2, 2, lambda k: "attn" in k), 1.0)
    return root


def draw_args(tiny_sd, out, *extra) -> list[str]:
    return ["generate", "--model", str(tiny_sd), "--w", "64", "--h", "64", "--steps", "1", "--seed", "1", "--out",
            str(out), "--quiet", *map(str, extra)]


def pictures(folder) -> list:
    return sorted(p for p in folder.glob("*.png") if not p.name.startswith("sheet")) if folder.is_dir() else []


# -- 1-5: an output never replaces an input or a user's file ----------------------------------------------
def test_a_diffusers_merge_into_a_users_folder_removes_nothing(tiny_sd, loras, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8 a photo")
    (folder / "notes.txt").write_text("my notes")
    before = snapshot(folder)
    code, err = lora_main(capsys, "merge", "--model", tiny_sd, "--lora", loras / "a.safetensors", "--format",
                          "diffusers", "--out", folder, "--overwrite")
    check_result(code, 2, err, str(folder), "never emptied")
    assert snapshot(folder) == before


def test_a_diffusers_merge_over_the_base_models_own_folder_is_refused(tiny_sd, loras, capsys):
    before = snapshot(tiny_sd)
    code, err = lora_main(capsys, "merge", "--model", tiny_sd, "--lora", loras / "a.safetensors", "--format",
                          "diffusers", "--out", tiny_sd, "--overwrite")
    check_result(code, 2, err, "input")
    assert snapshot(tiny_sd) == before


def test_a_checkpoint_merge_over_the_base_file_is_refused(loras, tmp_path, capsys):
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"the user's only copy of a checkpoint")
    code, err = lora_main(capsys, "merge", "--model", base, "--lora", loras / "a.safetensors", "--out", base,
                          "--overwrite")
    check_result(code, 2, err, "base.safetensors", "never replaces an input")
    assert base.read_bytes() == b"the user's only copy of a checkpoint"


@pytest.mark.parametrize("through_link", [False, True])
def test_a_lora_merge_over_one_of_its_inputs_is_refused(loras, tmp_path, capsys, through_link):
    a = tmp_path / "a.safetensors"
    a.write_bytes((loras / "a.safetensors").read_bytes())
    given = a
    if through_link:
        given = tmp_path / "link.safetensors"
        given.symlink_to(a)
    before = a.read_bytes()
    code, err = lora_main(capsys, "merge", "--lora", f"{given}:0.7", "--lora", f"{loras / 'b.safetensors'}:0.5",
                          "--out", a, "--overwrite")
    check_result(code, 2, err, "never replaces an input")
    assert a.read_bytes() == before and not a.is_symlink()


def test_an_existing_output_is_replaced_only_with_overwrite(tiny_sd, loras, tmp_path, capsys):
    mine = tmp_path / "mix.safetensors"
    mine.write_bytes(b"someone's file")
    merge = ["merge", "--lora", loras / "a.safetensors", "--lora", loras / "b.safetensors", "--out", mine]
    code, err = lora_main(capsys, *merge)
    check_result(code, 2, err, "already exists", "--overwrite")
    assert mine.read_bytes() == b"someone's file"
    code, err = lora_main(capsys, "resize", loras / "a.safetensors", "--rank", "2", "--out", mine)
    check_result(code, 2, err, "already exists", "--overwrite")
    assert mine.read_bytes() == b"someone's file"
    assert lora_main(capsys, *merge, "--overwrite")[0] == 0
    with safe_open(str(mine), framework="pt") as handle:
        assert handle.metadata()["ss_network_dim"] == "Dynamic"  # the merge, ranks 4 and 2
    # A folder an earlier merge wrote may be replaced with --overwrite; without it, it is kept.
    folder = tmp_path / "merged"
    bake = ["merge", "--model", tiny_sd, "--lora", loras / "a.safetensors", "--format", "diffusers", "--out", folder,
            "--save-precision", "fp32"]
    assert lora_main(capsys, *bake)[0] == 0
    first = snapshot(folder)
    code, err = lora_main(capsys, *bake)
    check_result(code, 2, err, "--overwrite")
    assert snapshot(folder) == first
    assert lora_main(capsys, *bake[:4], f"{loras / 'a.safetensors'}:0.5", *bake[5:], "--overwrite")[0] == 0
    second = snapshot(folder)
    assert second.keys() == first.keys() and second != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or old copy left


# -- 6: prompt tags stay inside the LoRA folders ------------------------------------------------------------
def test_prompt_tags_resolve_inside_the_lora_folders_only(loras, tmp_path, capsys):
    inside, outside = tmp_path / "loras", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    (outside / "evil.safetensors").write_bytes((loras / "a.safetensors").read_bytes())
    (inside / "sneaky.safetensors").symlink_to(outside / "evil.safetensors")
    for name in ("../outside/evil", str(outside / "evil"), "sub/../../outside/evil"):
        with pytest.raises(JobError, match="outside"):
            resolve_tag(name, [inside])
    with pytest.raises(JobError, match="outside"):
        resolve_tag("sneaky", [inside])
    code, err = lora_main(capsys, "generate", "--prompt", "a fox <lora:../outside/evil:1>", "--lora-dir", inside,
                          "--out", tmp_path / "out")
    check_result(code, 2, err, "../outside/evil", "outside")
    assert not pictures(tmp_path / "out")


# -- 7: weights that would draw a NaN picture -------------------------------------------------------------
@pytest.mark.parametrize("where, value, named", [
    ("lora", "1e309", "inf"), ("lora", "-1e30", "-1e+30"), ("lora", "nan", "nan"), ("tag", "nan", "<lora:a:nan>"),
    ("tag", "1e400", "inf"), ("emphasis", "9" * 400, "out of range"),
])
def test_non_finite_and_absurd_weights_are_refused_with_their_source(tiny_sd, loras, tmp_path, capsys, where, value,
                                                                      named):
    extra = {"lora": ["--lora", f"{loras / 'a.safetensors'}:{value}", "--prompt", "a fox"],
             "tag": ["--lora-dir", loras, "--prompt", f"a fox <lora:a:{value}>"],
             "emphasis": ["--prompt", f"(fox:{value})"]}[where]
    code, err = lora_main(capsys, *draw_args(tiny_sd, tmp_path / "out", *extra))
    check_result(code, 2, err, named)
    assert not pictures(tmp_path / "out")


def test_a_lora_file_holding_inf_is_refused_by_every_user_of_it(tiny_sd, plain, tmp_path, capsys):
    modules = random_modules(plain, 5, 4, lambda k: k == Q)
    modules[Q][1][0, 0] = float("inf")
    bad = write_kohya(tmp_path / "inf.safetensors", modules)
    for args in (draw_args(tiny_sd, tmp_path / "out", "--lora", bad, "--prompt", "a"),
                 ["merge", "--model", tiny_sd, "--lora", bad, "--out", tmp_path / "m.safetensors"],
                 ["resize", bad, "--rank", "2"]):
        code, err = lora_main(capsys, *args)
        check_result(code, 2, err, "inf.safetensors", Q, "NaN or infinite")
    assert not pictures(tmp_path / "out") and not list(tmp_path.glob("m*.safetensors"))
    assert not list(tmp_path.glob("inf-r2*"))


def test_a_picture_that_comes_out_nan_is_never_saved():
    from lorasmith.models.sampling import NonFinitePicture, finite_picture

    class Pipe:
        numpy_to_pil = staticmethod(lambda images: [Image.fromarray((images[0] * 255).round().astype("uint8"))])

    good = np.full((1, 8, 8, 3), 0.5, dtype=np.float32)
    assert np.asarray(finite_picture(Pipe, good)).max() == 128
    good[0, 3, 3, 1] = np.nan
    with pytest.raises(NonFinitePicture, match="NaN or infinite"):
        finite_picture(Pipe, good)


# -- 8, 13, 14: damaged modules ---------------------------------------------------------------------------
def test_a_module_whose_ranks_disagree_is_named_by_every_subcommand(tiny_sd, plain, tmp_path, capsys):
    modules = random_modules(plain, 6, 4, lambda k: "attn1_to" in k)
    down, up = modules[Q]
    modules[Q] = (down, up[:, :3])
    bad = write_kohya(tmp_path / "ranks.safetensors", modules)
    code, err = lora_main(capsys, "info", bad, "--model", tiny_sd)
    check_result(code, 1, err, Q, "rank 4", "rank 3")
    assert "health: ok" not in err
    for args in (["merge", "--model", tiny_sd, "--lora", bad, "--out", tmp_path / "m.safetensors"],
                 ["merge", "--lora", bad, "--out", tmp_path / "m.safetensors"],
                 ["resize", bad, "--rank", "2"],
                 draw_args(tiny_sd, tmp_path / "out", "--lora", bad, "--prompt", "a")):
        code, err = lora_main(capsys, *args)
        check_result(code, 2, err, "ranks.safetensors", Q, "rank 4 but up has rank 3")
    assert not list(tmp_path.glob("m*.safetensors")) and not pictures(tmp_path / "out")


def test_an_alpha_stored_as_a_vector_is_one_sentence(plain, tmp_path, capsys):
    down, up = random_modules(plain, 7, 4, lambda k: k == Q)[Q]
    path = tmp_path / "alpha.safetensors"
    save_file({f"{Q}.lora_down.weight": down, f"{Q}.lora_up.weight": up, f"{Q}.alpha": torch.ones(4)}, str(path))
    for args in (["resize", path, "--rank", "2"], ["merge", "--lora", path, "--out", tmp_path / "m.safetensors"]):
        code, err = lora_main(capsys, *args)
        check_result(code, 2, err, "alpha.safetensors", f"{Q}.alpha holds 4 values")
    code, err = lora_main(capsys, "info", path)
    check_result(code, 1, err, "alpha.safetensors", "holds 4 values")


# -- 9: resize never pads ---------------------------------------------------------------------------------
def test_resize_to_a_rank_above_the_files_is_refused_and_lower_modules_keep_theirs(plain, tmp_path, capsys):
    four = write_kohya(tmp_path / "four.safetensors", random_modules(plain, 8, 4, lambda k: "attn1_to" in k))
    code, err = lora_main(capsys, "resize", four, "--rank", "16")
    check_result(code, 2, err, "four.safetensors", "rank 4 already")
    assert not list(tmp_path.glob("four-r16*"))
    mixed = random_modules(plain, 9, 4, lambda k: "attn1_to_q" in k)
    mixed.update(random_modules(plain, 10, 2, lambda k: "attn1_to_k" in k))
    path = write_kohya(tmp_path / "mixed.safetensors", mixed)
    code, out = lora_main(capsys, "resize", path, "--rank", "3")
    assert code == 0 and f"{sum('attn1_to_k' in k for k in mixed)} modules of rank 3 or less kept their rank" in out
    with safe_open(str(tmp_path / "mixed-r3.safetensors"), framework="pt") as handle:
        ranks = {k.split(".")[0]: handle.get_tensor(k).shape[0] for k in handle.keys() if k.endswith("lora_down.weight")}
    assert {r for k, r in ranks.items() if "to_q" in k} == {3} and {r for k, r in ranks.items() if "to_k" in k} == {2}


# -- 10: numbers and text in options and prompt files -------------------------------------------------------
def test_cfg_nan_a_zero_step_line_and_a_latin1_prompts_file(tiny_sd, loras, tmp_path, capsys):
    code, err = lora_main(capsys, *draw_args(tiny_sd, tmp_path / "out", "--prompt", "a", "--cfg", "nan"))
    check_result(code, 2, err, "--cfg", "finite")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("pâte à modeler, a fox --s 2\n".encode("latin-1"))
    code, err = lora_main(capsys, *draw_args(tiny_sd, tmp_path / "out", "--prompts", latin))
    check_result(code, 2, err, "latin.txt", "not UTF-8")
    zero = tmp_path / "zero.txt"
    zero.write_text("a fox --s 0\n", encoding="utf-8")
    code, err = lora_main(capsys, *draw_args(tiny_sd, tmp_path / "out", "--prompts", zero))
    check_result(code, 0, err, "zero.txt:1", "--s 0", "using 1")
    assert Image.open(pictures(tmp_path / "out")[0]).text["parameters"].count("Steps: 1,") == 1
    assert not pictures(tmp_path / "out")[1:]


# -- 11, 12: prompts and sizes that would hang or exhaust memory --------------------------------------------
def test_a_ten_thousand_word_prompt_label_is_cut_before_measuring(monkeypatch):
    from PIL import ImageDraw

    from lorasmith.use.grid import table_grid

    measured = []
    real = ImageDraw.ImageDraw.textlength
    monkeypatch.setattr(ImageDraw.ImageDraw, "textlength",
                        lambda self, text, *a, **k: measured.append(len(text)) or real(self, text, *a, **k))
    words = "clay " * 10_000
    grid = table_grid([[Image.new("RGB", (64, 64))]], [words], [], words, tile=64)
    assert grid.width < 1000
    assert len(measured) < 60 and max(measured) <= 1000  # bisection over a cut label, never the whole text


def test_sizes_beyond_the_bound_and_beyond_memory_are_refused(tiny_sd, tmp_path, capsys):
    from lorasmith.use.budget import picture_bytes, too_big

    code, err = lora_main(capsys, *draw_args(tiny_sd, tmp_path / "out", "--prompt", "a"), "--w", "100000")
    check_result(code, 2, err, "--w", "4096")
    big = tmp_path / "big.txt"
    big.write_text("a fox --w 100000\n", encoding="utf-8")
    code, err = lora_main(capsys, *draw_args(tiny_sd, tmp_path / "out", "--prompts", big))
    assert "--w 100000: sizes must be multiples of 8 from 64 to 4096" in err
    assert picture_bytes(1024, 512) == 2 * picture_bytes(512, 512) == 2 * 512 * 512 * 128 * 4 * 4
    assert too_big(512, 512, 4, 24 * 2**30) == "" and too_big(4096, 4096, 4, None) == ""
    message = too_big(4096, 4096, 4, 8 * 2**30)
    assert message.startswith("a 4096×4096 picture needs about 32.0 GiB") and "8.0 GiB is available" in message
    assert "at most about 2048×2048" in message


# -- 15: read-only and full disks, a file where a folder goes ----------------------------------------------
def test_a_read_only_out_folder_is_one_sentence(loras, tmp_path):
    prefix = unprivileged()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    done = run("lora", "merge", "--lora", loras / "a.safetensors", "--lora", loras / "b.safetensors", "--out",
               locked / "ab.safetensors", prefix=prefix)
    check(done, 1, "ab.safetensors", "Permission denied")
    assert not list(locked.iterdir())


def test_a_full_disk_is_one_sentence_for_merge_and_generate(tiny_sd, loras, tmp_path, capsys):
    with tiny_disk(tmp_path / "disk", 256, leave_kib=8) as disk:
        code, err = lora_main(capsys, "merge", "--model", tiny_sd, "--lora", loras / "a.safetensors", "--out",
                              disk / "model.safetensors")
        check_result(code, 1, err, "model.safetensors", "full")
        code, err = lora_main(capsys, *draw_args(tiny_sd, disk / "pictures", "--prompt", "a fox", "--n", "3"))
        check_result(code, 1, err, "full")
        assert not [p for p in disk.rglob("*") if p.name.endswith((".part", ".safetensors"))]


def test_a_diffusers_out_that_is_a_file_is_one_sentence(tiny_sd, loras, tmp_path, capsys):
    target = tmp_path / "model.bin"
    target.write_bytes(b"x")
    code, err = lora_main(capsys, "merge", "--model", tiny_sd, "--lora", loras / "a.safetensors", "--format",
                          "diffusers", "--out", target, "--overwrite")
    check_result(code, 2, err, "model.bin", "is a file")
    code, err = lora_main(capsys, *draw_args(tiny_sd, target, "--prompt", "a"))
    check_result(code, 2, err, "model.bin", "is a file")
    assert target.read_bytes() == b"x"


# -- 16, 17: what a new user meets --------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_a_merged_fp16_folder_draws_on_the_cpu(tiny_sd, loras, tmp_path_factory, capsys, precision):
    folder = tmp_path_factory.getbasetemp() / "merged-fp16"
    if not folder.is_dir():
        assert lora_main(capsys, "merge", "--model", tiny_sd, "--lora", loras / "a.safetensors", "--format",
                         "diffusers", "--out", folder)[0] == 0
    out = tmp_path_factory.mktemp("fp16-out")
    code, err = lora_main(capsys, *draw_args(folder, out, "--prompt", "a fox", "--precision", precision))
    check_result(code, 0, err)
    (picture,) = pictures(out)
    assert np.asarray(Image.open(picture)).std() > 1  # a drawn picture, not a flat square


def test_info_without_a_model_checks_names_only_against_a_public_architecture(tmp_path, capsys):
    toy = load_components(str(REPO / "toy" / "base"), ("text_encoder", "unet"))
    table = layer_table(toy.unet, toy.text_encoder, aliases=False)
    small = write_kohya(tmp_path / "toy-clay.safetensors", random_modules(table, 11, 4, attention_and_text))
    code, out = lora_main(capsys, "info", small)
    check_result(code, 0, out, "names: not checked", "64-wide text", "--model")
    assert "health: ok" in out and "legacy n/a (the file is under 1 MiB" in out
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    sd15 = write_kohya(tmp_path / "sd15.safetensors", {k: (torch.ones(4, 768), torch.ones(320, 4)),
                                                       "lora_unet_no_such_layer": (torch.ones(4, 8), torch.ones(8, 4))},
                       metadata={"ss_num_train_images": "1370"})
    code, out = lora_main(capsys, "info", sd15)
    check_result(code, 1, out, "names: checked against the SD1.5 architecture", "lora_unet_no_such_layer")
    assert "image views per epoch (images × repeats) 1370" in out


def test_help_texts_say_what_each_subcommand_takes(capsys):
    code, out = lora_main(capsys, "generate", "--help")
    out = " ".join(out.split())
    assert code == 0 and "single-file checkpoint" in out.replace("- ", "-") and "lora merge" not in out and "±100" in out
    for sub in ("merge", "resize"):
        code, out = lora_main(capsys, sub, "--help")
        assert code == 0 and "--overwrite" in out


def test_the_contact_sheet_title_counts_in_words():
    from lorasmith.use.commands import _plural

    assert [_plural(n, "picture") for n in (0, 1, 2)] == ["0 pictures", "1 picture", "2 pictures"]

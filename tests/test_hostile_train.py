"""train-lora against typos in presets, messy datasets, two terminals, full disks and signals at bad moments."""

import errno
import hashlib
import json
import os
import shutil
import signal

import pytest
import torch
from safetensors import safe_open

from conftest import make_image, small_dataset, write_preset
from hostile import check, check_result, run, slow_replace, snapshot, start, tiny_disk, unprivileged, wait_for_mark
from lorasmith.train import cli


def main(capsys, *args: str) -> tuple[int, str]:
    code = cli.main([*map(str, args), "--quiet"])
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def sets(*items: str) -> list[str]:
    return [x for item in items for x in ("--set", item)]


@pytest.fixture
def dataset(tmp_path):
    return small_dataset(tmp_path / "data", images=3, repeats=2)


@pytest.fixture
def preset(tmp_path, dataset):
    return write_preset(tmp_path / "p.toml", tmp_path / "no-model", dataset, tmp_path / "out")


def plan_images(text: str) -> int:
    line = next(x for x in text.splitlines() if x.startswith("images: "))
    return int(line.split()[1].rstrip(";"))


# -- the preset -------------------------------------------------------------------------------------------
def test_a_preset_path_that_is_a_folder_is_named(tmp_path, capsys):
    code, err = main(capsys, tmp_path, "--dry-run")
    check_result(code, 2, err, str(tmp_path))


def test_a_preset_saved_with_a_bom_loads(preset, capsys):
    preset.write_bytes(b"\xef\xbb\xbf" + preset.read_bytes())
    code, err = main(capsys, preset, "--dry-run")
    check_result(code, 0, err)


@pytest.mark.parametrize("setting", [
    "optimizer.unet_lr=-1", "optimizer.text_encoder_lr=-0.5", "optimizer.weight_decay=-0.01",
    "optimizer.max_grad_norm=-1", "optimizer.learning_rate=nan", "optimizer.learning_rate=inf",
    "training.min_snr_gamma=-5", "training.seed=-1", "training.noise_offset=-0.1", "training.clip_skip=0",
    "network.network_dropout=1.0", "network.network_dropout=-0.1", "network.conv_alpha=0",
    "dataset.prior_loss_weight=-1", "schedule.lr_warmup_steps=-1", "schedule.lr_scheduler_num_cycles=0",
    "output.output_name=", "output.output_name=a/b", "output.output_name=.hidden", "dataset.caption_extension=.png",
    "dataset.caption_extension=",
])
def test_out_of_range_settings_name_the_key_and_the_range(preset, capsys, setting):
    code, err = main(capsys, preset, "--dry-run", *sets(setting))
    check_result(code, 2, err, setting.split("=")[0])


@pytest.mark.parametrize("settings, named", [
    (["dataset.min_bucket_reso=512", "dataset.max_bucket_reso=256"], "min_bucket_reso"),
    (["dataset.bucket_reso_steps=0"], "bucket_reso_steps"),
    (["dataset.resolution=128", "dataset.min_bucket_reso=256"], "resolution"),
])
def test_bucket_settings_that_cannot_work_are_refused(preset, settings, named):
    done = run("train-lora", preset, "--dry-run", *sets(*settings), timeout=60)
    check(done, 2, named)


@pytest.mark.parametrize("line", ["max_train_epochs = 1e11", "max_train_epochs = 100000000000"])
def test_an_absurd_epoch_count_is_refused_at_once(preset, line):
    preset.write_text(preset.read_text(encoding="utf-8").replace("[training]", f"[training]\n{line}"),
                      encoding="utf-8")
    done = run("train-lora", preset, "--dry-run", timeout=60)
    check(done, 2, "max_train_epochs")


# -- the dataset ------------------------------------------------------------------------------------------
def test_own_outputs_in_the_training_root_are_never_read_as_data(tmp_path, dataset, capsys):
    for folder in ("5_x.samples", "5_x.state", "5_x.logs"):
        make_image(dataset / folder / "e000001-s00000002-00.png", size=(64, 64))
    preset = write_preset(tmp_path / "p.toml", tmp_path / "no-model", dataset, dataset, output={"output_name": "5_x"})
    code, err = main(capsys, preset, "--dry-run")
    check_result(code, 0, err)
    assert plan_images(err) == 3 and "5_x.samples" not in err


def test_pictures_outside_repeat_folders_are_named(dataset, preset, capsys):
    for folder in ("raw", "0_x", "abc_x", "10_"):
        make_image(dataset / folder / "stray.png", size=(64, 64))
    code, err = main(capsys, preset, "--dry-run")
    check_result(code, 0, err, "raw", "0_x", "abc_x", "10_")
    assert plan_images(err) == 3


def test_non_pictures_in_a_repeat_folder_are_named_and_left_out(dataset, preset, capsys):
    folder = dataset / "2_clay"
    (folder / "notes.png").write_text("not a picture", encoding="utf-8")
    (folder / "empty.png").write_bytes(b"")
    good = make_image(dataset.parent / "whole.png", size=(128, 128), seed=9)
    (folder / "cut.png").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    code, err = main(capsys, preset, "--dry-run")
    check_result(code, 0, err, "notes.png", "empty.png", "cut.png")
    assert plan_images(err) == 3


def test_captions_in_utf16_or_with_a_bom_are_read_as_text(dataset, preset):
    from lorasmith.train.config import load_config
    from lorasmith.train.trainer import plan_run

    folder = dataset / "2_clay"
    (folder / "img0.txt").write_bytes("claymation style, blob é".encode("utf-16"))
    (folder / "img1.txt").write_bytes("\ufeffclaymation style, blob 1".encode("utf-8"))
    dataset_, _ = plan_run(load_config(preset))
    captions = {item.image.name: item.caption for item in dataset_.items}
    assert captions["img0.png"] == "claymation style, blob é"
    assert captions["img1.png"] == "claymation style, blob 1"


def test_captions_that_cannot_be_read_are_named_and_their_pictures_left_out(dataset, preset, capsys):
    folder = dataset / "2_clay"
    (folder / "img0.txt").write_bytes("caf\xe9".encode("latin-1"))
    (folder / "img1.txt").unlink()
    (folder / "img1.txt").mkdir()
    code, err = main(capsys, preset, "--dry-run")
    check_result(code, 0, err, "img0.txt", "img1.txt")
    assert plan_images(err) == 1


@pytest.mark.parametrize("text", ["глиняный стиль, шар", "claymation style, 一 blob"])
@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_captions_in_utf16_without_a_mark_are_read_as_text(dataset, preset, text, encoding):
    from lorasmith.train.config import load_config
    from lorasmith.train.trainer import plan_run

    (dataset / "2_clay" / "img0.txt").write_bytes(text.encode(encoding))  # Cyrillic: no NUL byte at all
    dataset_, _ = plan_run(load_config(preset))
    assert {item.image.name: item.caption for item in dataset_.items}["img0.png"] == text


@pytest.mark.parametrize("data, named", [(b"claymation style\x1b[31m, blob", "U+001B"),
                                         (b"clay\x07, blob", "U+0007")])
def test_a_caption_that_is_not_clean_text_is_named_and_its_picture_left_out(dataset, preset, capsys, data, named):
    (dataset / "2_clay" / "img0.txt").write_bytes(data)
    code, err = main(capsys, preset, "--dry-run")
    check_result(code, 0, err, "img0.txt", named)
    assert plan_images(err) == 2


@pytest.mark.parametrize("cut", [12, 20])
def test_a_png_cut_short_at_its_end_is_named_and_left_out(dataset, preset, capsys, cut):
    good = make_image(dataset.parent / "whole.png", size=(128, 128), seed=9)
    (dataset / "2_clay" / "cut.png").write_bytes(good.read_bytes()[:-cut])  # the IEND chunk (and checksums) gone
    code, err = main(capsys, preset, "--dry-run")
    check_result(code, 0, err, "cut.png", "truncated")
    assert plan_images(err) == 3


def test_own_outputs_are_known_by_their_marker_whatever_their_name(tmp_path, tiny_sd, dataset, capsys):
    (tmp_path / "prompts.txt").write_text("a blob --w 64 --h 64 --s 1\n", encoding="utf-8")
    preset = write_preset(tmp_path / "p.toml", tiny_sd, dataset, dataset, training={"max_train_steps": 1},
                          output={"output_name": "5_x", "save_state_every_n_steps": 1},
                          sample={"sample_prompts": str(tmp_path / "prompts.txt"), "sample_every_n_steps": 1})
    code, err = main(capsys, preset)
    check_result(code, 0, err)
    assert list((dataset / "5_x.samples").glob("*.png"))
    code, err = main(capsys, preset, "--dry-run", *sets("output.output_name=6_y"))
    check_result(code, 0, err)
    assert plan_images(err) == 3 and "5_x" not in err
    from lorasmith.common.layout import OUTPUT_MARKER

    for kind in ("samples", "state", "logs"):
        assert (dataset / f"5_x.{kind}" / OUTPUT_MARKER).is_file(), kind


def test_metadata_jsonl_problems(tmp_path, capsys):
    data = tmp_path / "meta"
    make_image(data / "a.png", size=(128, 128))
    make_image(data / "b.png", size=(128, 128), seed=2)
    lines = ['{"file_name": "a.png", "text": null}', "{not json", '{"file_name": "b.png", "text": "a cube"}']
    (data / "metadata.jsonl").write_text("\n".join(lines), encoding="utf-8")
    preset = write_preset(tmp_path / "p.toml", tmp_path / "no-model", data, tmp_path / "out")
    code, err = main(capsys, preset, "--dry-run")
    check_result(code, 0, err, "metadata.jsonl:1", "metadata.jsonl:2")
    assert plan_images(err) == 2
    from lorasmith.train.config import load_config
    from lorasmith.train.trainer import plan_run

    items, _ = plan_run(load_config(preset))
    assert sorted(i.caption for i in items.items) == ["", "a cube"]
    (data / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "x"}\n', encoding="utf-8")
    code, err = main(capsys, preset, "--dry-run")
    check_result(code, 2, err, "metadata.jsonl", "gone.png")


def test_unreadable_pictures_captions_and_output_folders_are_named(tmp_path, dataset):
    prefix = unprivileged()
    folder = dataset / "2_clay"
    (folder / "img0.png").chmod(0)
    (folder / "img1.txt").chmod(0)
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    preset = write_preset(tmp_path / "p.toml", tmp_path / "no-model", dataset, out)
    done = run("train-lora", preset, "--dry-run", prefix=prefix, timeout=120)
    check(done, 0, "img0.png", "img1.txt")
    done = run("train-lora", preset, "--quiet", prefix=prefix, timeout=120)
    check(done, 2, str(out))


# -- runs -------------------------------------------------------------------------------------------------
def states_by_seed(root) -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    for manifest in root.glob("*/manifest.json"):
        data = json.loads(manifest.read_text(encoding="utf-8"))
        found.setdefault(data["config"]["training.seed"], []).append(data["step"])
    return {seed: sorted(steps) for seed, steps in found.items()}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_sd):
    """Run A (seed 42, 4 steps), then a fresh run B (seed 7, 2 steps) into the same output name."""
    root = tmp_path_factory.mktemp("two")
    data = small_dataset(root / "data", images=2, repeats=2)
    preset = write_preset(root / "p.toml", tiny_sd, data, root / "out",
                          training={"max_train_steps": 4, "train_batch_size": 1},
                          output={"save_state_every_n_steps": 1, "save_last_n_states": 2})
    assert cli.main([str(preset), "--quiet"]) == 0
    assert cli.main([str(preset), "--quiet", "--set", "training.seed=7", "--set", "training.max_train_steps=2"]) == 0
    return preset, root / "out"


def test_a_fresh_run_never_prunes_or_resumes_another_runs_states(two_runs, capsys):
    preset, out = two_runs
    assert states_by_seed(out / "test.state") == {42: [3, 4], 7: [1, 2]}
    code, err = main(capsys, preset, "--resume", "auto", "--set", "training.seed=7",
                     "--set", "training.max_train_steps=2")
    check_result(code, 0, err, "at step 2")


def edited_state(two_runs, tmp_path, edit) -> tuple:
    preset, out = two_runs
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    folder = next(m.parent for m in (copy / "test.state").glob("*/manifest.json")
                  if json.loads(m.read_text(encoding="utf-8"))["step"] == 4)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    edit(folder, manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return preset, copy, folder


def test_a_hand_edited_manifest_step_is_refused(two_runs, tmp_path, capsys):
    preset, out, folder = edited_state(two_runs, tmp_path, lambda folder, m: m.update(step=3))
    code, err = main(capsys, preset, "--resume", folder, "--force", "--set", f"output.output_dir={out}")
    check_result(code, 2, err, "manifest.json", "step")


def test_a_manifest_missing_a_key_is_refused(two_runs, tmp_path, capsys):
    preset, out, folder = edited_state(two_runs, tmp_path, lambda folder, m: m.pop("position"))
    code, err = main(capsys, preset, "--resume", folder, "--set", f"output.output_dir={out}")
    check_result(code, 2, err, str(folder))


def test_a_state_file_replaced_by_hand_is_refused(two_runs, tmp_path, capsys):
    def damage(folder, manifest):
        data = b"not a torch file"
        (folder / "training.pt").write_bytes(data)
        manifest["files"]["training.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    preset, out, folder = edited_state(two_runs, tmp_path, damage)
    code, err = main(capsys, preset, "--resume", folder, "--set", f"output.output_dir={out}")
    check_result(code, 2, err, "training.pt")


def test_a_state_whose_tensors_do_not_fit_the_network_is_refused_even_with_force(two_runs, tmp_path, capsys):
    preset, out = two_runs
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    code, err = main(capsys, preset, "--resume", "auto", "--force", *sets(f"output.output_dir={copy}",
                                                                          "network.network_dim=8"))
    check_result(code, 2, err, "adapters.safetensors", "lora_", "[4, ", "[8, ")


def test_an_impossible_clip_skip_names_the_key(tmp_path, tiny_sd, dataset, capsys):
    preset = write_preset(tmp_path / "p.toml", tiny_sd, dataset, tmp_path / "out", training={"clip_skip": 40})
    code, err = main(capsys, preset)
    check_result(code, 2, err, "training.clip_skip")


def test_leftovers_of_a_killed_run_are_cleared(tmp_path, tiny_sd, dataset, capsys):
    out = tmp_path / "out"
    leftovers = [out / ".test.safetensors.x8d7.part", out / "test.samples" / ".e000001-00.png.ab12.part",
                 out / "test.logs" / ".loss.csv.zz9.part", out / ".test.report.html.q1.part"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    preset = write_preset(tmp_path / "p.toml", tiny_sd, dataset, out, training={"max_train_steps": 1})
    code, err = main(capsys, preset)
    check_result(code, 0, err)
    assert not [p for p in out.rglob("*") if p.name.endswith(".part")]


@pytest.mark.parametrize("target", ["test.report.html", "-grid.png"])
def test_disk_full_while_writing_the_report_or_samples_is_one_message(tmp_path, tiny_sd, dataset, capsys,
                                                                      monkeypatch, target):
    (tmp_path / "prompts.txt").write_text("a blob --w 64 --h 64 --s 1\n", encoding="utf-8")
    preset = write_preset(tmp_path / "p.toml", tiny_sd, dataset, tmp_path / "out", training={"max_train_steps": 2},
                          sample={"sample_prompts": str(tmp_path / "prompts.txt"), "sample_every_n_steps": 1})
    replace = os.replace

    def full(src, dst, *args, **kwargs):
        if os.fspath(dst).endswith(target):
            raise OSError(errno.ENOSPC, "No space left on device")
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full)
    before = snapshot(dataset)
    code, err = main(capsys, preset)
    check_result(code, 1, err, "full", "MiB free", target)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".part")]
    assert snapshot(dataset) == before


def test_a_really_full_disk_is_one_message(tmp_path, tiny_sd, dataset, capsys):
    with tiny_disk(tmp_path / "disk", 1024, leave_kib=60) as disk:
        preset = write_preset(tmp_path / "p.toml", tiny_sd, dataset, disk / "out", training={"max_train_steps": 3},
                              output={"save_state_every_n_steps": 1, "log_tensorboard": False})
        code, err = main(capsys, preset)
        check_result(code, 1, err, "MiB free", str(disk / "out"))
        assert err.count(" is full") == 1, err
        assert not [p for p in disk.rglob("*") if p.name.endswith(".part")]


def test_metadata_names_no_absolute_path_and_follows_kohya(tmp_path, tiny_sd, dataset):
    model = tmp_path.joinpath(*["very-long-folder-name-" * 3] * 4, "my-base-model")
    shutil.copytree(tiny_sd, model)
    preset = write_preset(tmp_path / "p.toml", model, dataset, tmp_path / "out",
                          training={"max_train_steps": 1, "clip_skip": 2})
    assert cli.main([str(preset), "--quiet"]) == 0
    with safe_open(str(tmp_path / "out" / "test.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_sd_model_name"] == "my-base-model"
    assert not [k for k, v in meta.items() if str(tmp_path) in v or "/tmp" in v]
    assert meta["modelspec.encoder_layer"] == "2"
    buckets = json.loads(meta["ss_bucket_info"])
    assert [b["count"] for b in buckets["buckets"].values()] == [6] and buckets["mean_img_ar_error"] == 0
    assert meta["ss_num_validation_images"] == "0" and meta["ss_min_bucket_reso"] == "64"


def test_the_legacy_hash_is_kohyas(tmp_path):
    from safetensors.torch import save

    from lorasmith.lorafile.export import save_lora

    tensors = {"lora_unet_x.lora_down.weight": torch.arange(600_000, dtype=torch.float32).reshape(600, 1000)}
    metadata = {"ss_output_name": "x", "modelspec.title": "a title long enough to move the tensor data"}
    path = save_lora(tmp_path / "x.safetensors", tensors, metadata)
    kohya = save(tensors, {"ss_output_name": "x"})  # Kohya hashes a file that holds only the ss_* metadata
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["sshs_legacy_hash"] == hashlib.sha256(kohya[0x100000:0x110000]).hexdigest()[:8]


# -- signals and a second terminal: real processes --------------------------------------------------------
def test_sigterm_while_caching_latents_exits_75_with_nothing_to_resume(tmp_path, tiny_sd, dataset):
    mark = tmp_path / "mark"
    preset = write_preset(tmp_path / "p.toml", tiny_sd, dataset, tmp_path / "out",
                          dataset={"cache_latents_to_disk": True})
    process = start("train-lora", preset, "--quiet", env=slow_replace(".latent_cache", 2, mark))
    wait_for_mark(mark, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    check_result(process.returncode, 75, err, "SIGTERM", "before training")
    assert not [p for p in dataset.rglob("*") if p.name.endswith(".part")]


def test_sigterm_during_the_final_save_finishes_the_save(tmp_path, tiny_sd, dataset):
    mark = tmp_path / "mark"
    out = tmp_path / "out"
    preset = write_preset(tmp_path / "p.toml", tiny_sd, dataset, out, training={"max_train_steps": 2})
    process = start("train-lora", preset, "--quiet", env=slow_replace(f"{os.sep}test.safetensors", 2, mark))
    wait_for_mark(mark, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    check_result(process.returncode, (0, 75), err, "SIGTERM")
    with safe_open(str(out / "test.safetensors"), "pt") as f:
        assert len(list(f.keys())) > 0
    assert not [p for p in out.rglob("*") if p.name.endswith(".part")]


def test_a_second_run_on_the_same_output_is_refused_naming_the_first(tmp_path, tiny_sd, dataset, capsys):
    mark = tmp_path / "mark"
    preset = write_preset(tmp_path / "p.toml", tiny_sd, dataset, tmp_path / "out", training={"max_train_steps": 2})
    first = start("train-lora", preset, "--quiet", env=slow_replace("test.config.toml", 4, mark))
    wait_for_mark(mark, first)
    code, err = main(capsys, preset)
    check_result(code, 2, err, str(first.pid), "train-lora")
    _, err = first.communicate(timeout=120)
    check_result(first.returncode, 0, err)

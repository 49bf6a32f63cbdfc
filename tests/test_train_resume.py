"""train-lora as a batch job: killed and resumed runs end bit-identical, signals, NaN, refusals, the report."""

import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import small_dataset, write_preset
from lorasmith.train import cli
from lorasmith.train.signals import PREEMPTED_EXIT
from lorasmith.train.state import latest, read_state, states

BIN = Path(sys.executable).parent
PROMPTS = "# one prompt, tiny and quick\nclaymation style, a blob --w 64 --h 64 --s 2 --d 3 --n blurry\n"


def train(preset: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "train-lora"), str(preset), "--quiet", "--set", f"output.output_dir={out}",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: int = 240) -> tuple[int, str]:
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


def rows(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8") as handle:
        return list(csv.reader(handle))


def wait_for_step(out: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    """Poll loss.csv until it has `step` rows (the header aside)."""
    log = out / "test.logs" / "loss.csv"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"train-lora ended early: {process.communicate()[1][-2000:]}")
        if log.is_file() and len(rows(log)) > step:
            return
        time.sleep(0.01)
    raise AssertionError(f"step {step} never came")


def same_lora(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert sorted(ta) == sorted(tb) and len(ta) > 0
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_sd):
    """A preset that exercises every source of randomness (flips, caption shuffle, dropout, noise) with the
    text encoder trained, a held-out picture, samples each epoch and a state every step; and the LoRA an
    uninterrupted run of it writes."""
    root = tmp_path_factory.mktemp("job")
    data = small_dataset(root / "data", images=4, repeats=6)
    (root / "prompts.txt").write_text(PROMPTS, encoding="utf-8")
    preset = write_preset(
        root / "p.toml", tiny_sd, data, root / "unused",
        dataset={"validation_split": 0.25, "flip_aug": True, "shuffle_caption": True, "keep_tokens": 1},
        network={"network_dim": 4, "network_alpha": 2, "network_dropout": 0.1},
        optimizer={"learning_rate": 5e-3, "text_encoder_lr": 2e-3},
        training={"max_train_steps": 0, "max_train_epochs": 3, "train_batch_size": 2},
        output={"save_every_n_epochs": 1, "save_state_every_n_steps": 1, "save_last_n_states": 3},
        sample={"sample_prompts": str(root / "prompts.txt"), "sample_every_n_epochs": 1},
    )
    reference = root / "reference"
    code, err = finish(train(preset, reference))
    assert code == 0, err[-3000:]
    return preset, reference


def test_reference_run_writes_logs_samples_states_and_report(job):
    _, out = job
    loss = rows(out / "test.logs" / "loss.csv")
    assert loss[0] == ["step", "epoch", "loss", "lr"] and [r[0] for r in loss[1:]] == [str(s) for s in range(1, 28)]
    assert [r[:2] for r in rows(out / "test.logs" / "validation.csv")[1:]] == [["0", "0"], ["9", "1"], ["18", "2"],
                                                                                ["27", "3"]]
    grids = sorted(p.name for p in (out / "test.samples").glob("*-grid.png"))
    assert grids == ["e000001-s00000009-grid.png", "e000002-s00000018-grid.png", "e000003-s00000027-grid.png"]
    assert [f.step for f in states(out / "test.state") if f.complete] == [25, 26, 27]  # the last three kept
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["test-000001.safetensors", "test-000002.safetensors",
                                                                 "test.safetensors"]


def test_samples_and_states_do_not_change_the_weights(job, tmp_path):
    """Sampling and state saves draw no random numbers from training: without them, the same LoRA."""
    preset, reference = job
    out = tmp_path / "out"
    code, err = finish(train(preset, out, "--set", "sample.sample_prompts=", "--set", "output.save_state=false"))
    assert code == 0, err[-3000:]
    assert not (out / "test.samples").exists() and not (out / "test.state").exists()
    same_lora(out / "test.safetensors", reference / "test.safetensors")


def test_tensorboard_holds_the_same_losses_as_the_csv(job):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = job
    events = EventAccumulator(str(out / "test.logs" / "test"))
    events.Reload()
    train = [(e.step, e.value) for e in events.Scalars("loss/train")]
    assert train == [(int(r[0]), pytest.approx(float(r[2]), rel=1e-6)) for r in rows(out / "test.logs" / "loss.csv")[1:]]
    assert [e.step for e in events.Scalars("loss/validation")] == [0, 9, 18, 27]


def test_sigkill_at_a_random_step_then_resume_gives_the_same_lora(job, tmp_path):
    preset, reference = job
    kill_at = random.Random(os.urandom(8)).randint(2, 24)
    out = tmp_path / "out"
    process = train(preset, out)
    wait_for_step(out, kill_at, process)
    process.kill()  # SIGKILL: no handler runs, whatever the process was writing stays half-written
    process.wait()
    done = [f.step for f in states(out / "test.state") if f.complete]
    assert done, f"killed after step {kill_at} with no complete state"
    code, err = finish(train(preset, out, "--resume", "auto"))
    assert code == 0, err[-3000:]
    assert f"resumed from {out / 'test.state'}" in err, f"kill at {kill_at}: {err[-2000:]}"
    same_lora(out / "test.safetensors", reference / "test.safetensors")
    for name in ("loss.csv", "validation.csv"):  # rows a killed process wrote past its state are replaced
        assert rows(out / "test.logs" / name) == rows(reference / "test.logs" / name), f"{name}, kill at {kill_at}"
    assert (out / "test.report.html").read_text(encoding="utf-8").count('<figure><img alt="samples') == 3


def test_sigterm_writes_a_state_and_exits_with_the_preemption_code(job, tmp_path):
    preset, reference = job
    out = tmp_path / "out"
    process = train(preset, out, "--set", "output.save_state_every_n_steps=0")
    wait_for_step(out, 11, process)
    process.send_signal(signal.SIGTERM)
    code, err = finish(process)
    assert code == PREEMPTED_EXIT, err[-3000:]
    step = [f.step for f in states(out / "test.state") if f.complete][-1]
    assert step >= 11 and f"stopped by SIGTERM after step {step}; state saved in {out / 'test.state'}" in err
    assert "--resume auto" in err and "Traceback" not in err
    assert read_state(latest(out / "test.state")).manifest["step"] == step
    assert f"stopped by SIGTERM at step {step}" in (out / "test.report.html").read_text(encoding="utf-8")
    code, err = finish(train(preset, out, "--resume", "auto", "--set", "output.save_state_every_n_steps=0"))
    assert code == 0, err[-3000:]
    same_lora(out / "test.safetensors", reference / "test.safetensors")


def test_a_second_signal_exits_at_once(tmp_path):
    script = ("import time\nfrom lorasmith.train.signals import StopSignals\n"
              "with StopSignals() as s, s.defer('finishing this step'):\n    print('ready', flush=True)\n"
              "    time.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert process.poll() is None  # the first signal only asks
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 128 + signal.SIGTERM
    assert "SIGINT received: finishing this step" in err and "second SIGTERM: exiting now" in err


def test_resume_refuses_a_changed_preset_or_dataset_unless_forced(job, tmp_path, capsys):
    preset, reference = job
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    code = cli.main([str(preset), "--quiet", "--resume", "auto", "--set", f"output.output_dir={out}",
                     "--set", "optimizer.learning_rate=1e-2", "--set", "sample.sample_every_n_epochs=2"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{latest(out / 'test.state')} was written by a different run: preset optimizer.learning_rate: " \
           "0.005 then, 0.01 now. Undo the change" in err  # sample settings may change: not listed
    folder = preset.parent / "data" / "6_clay"
    extra = folder / "extra.png"
    shutil.copy(folder / "img0.png", extra)
    try:
        code = cli.main([str(preset), "--quiet", "--resume", "auto", "--set", f"output.output_dir={out}"])
        err = capsys.readouterr().err
        assert code == 2 and "dataset: 1 picture(s) added: extra.png" in err
        code = cli.main([str(preset), "--quiet", "--resume", "auto", "--force", "--set", f"output.output_dir={out}"])
        err = capsys.readouterr().err
        assert code == 0 and "warning: resuming with --force despite: dataset: 1 picture(s) added" in err
    finally:
        extra.unlink()


def test_a_state_from_before_a_key_existed_resumes_as_that_key_s_default(job, tmp_path, capsys):
    """A state written before a preset key was added (here: the Flux keys) holds no value for it; the run that
    wrote it ran as the key's default does now, so the resume is accepted, and a key set off its default is not."""
    import json

    preset, reference = job
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    manifest = latest(out / "test.state") / "manifest.json"
    data = json.loads(manifest.read_text(encoding="utf-8"))
    for key in ("training.guidance_scale", "dataset.t5xxl_max_token_length", "model.clip_l"):
        del data["config"][key]
    manifest.write_text(json.dumps(data), encoding="utf-8")
    code = cli.main([str(preset), "--quiet", "--resume", "auto", "--set", f"output.output_dir={out}",
                     "--set", "training.guidance_scale=2.0"])
    assert code == 2 and "preset training.guidance_scale: 1.0 then, 2.0 now" in capsys.readouterr().err
    code = cli.main([str(preset), "--quiet", "--resume", "auto", "--set", f"output.output_dir={out}"])
    assert code == 0, capsys.readouterr().err[-2000:]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_state(job, tmp_path, monkeypatch, capsys):
    from lorasmith.train.trainer import Trainer

    preset, _ = job
    original = Trainer._loss

    def poisoned(self, batch):
        loss = original(self, batch)
        return loss * float("nan") if self.step + 1 == 5 else loss

    monkeypatch.setattr(Trainer, "_loss", poisoned)
    out = tmp_path / "out"
    code = cli.main([str(preset), "--quiet", "--set", f"output.output_dir={out}",
                     "--set", "output.save_state_every_n_steps=2", "--set", "sample.sample_prompts="])
    err = capsys.readouterr().err
    assert code == 1
    state = latest(out / "test.state")
    assert state.name.startswith("step-00000004-")
    assert ("train-lora: error: the loss became nan at step 5. Likely causes: a learning rate too high "
            "(optimizer.learning_rate = 0.005; try a third of it)") in err
    assert f"The last good state is {state} (--resume auto continues from it)." in err
    assert [f.step for f in states(out / "test.state")] == [2, 4]
    weights = read_state(state).adapters
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (out / "test.safetensors").exists()
    assert "stopped: the loss became nan at step 5" in (out / "test.report.html").read_text(encoding="utf-8")


def test_disk_full_while_saving_a_lora_names_the_file_and_leaves_no_part(job, tmp_path, monkeypatch, capsys):
    import errno

    preset, _ = job
    out = tmp_path / "out"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    code = cli.main([str(preset), "--quiet", "--set", f"output.output_dir={out}", "--set", "output.save_state=false",
                     "--set", "sample.sample_prompts="])
    err = capsys.readouterr().err
    assert code == 1
    assert f"train-lora: error: the disk holding {out} is full" in err
    assert "while writing test-000001.safetensors; no earlier state was touched" in err
    assert not list(out.glob("*.safetensors")) and not list(out.glob(".*.part"))


CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const curve = document.querySelector('svg.curve polyline.average');
  const box = curve ? curve.getBBox() : {width: 0};
  const points = curve ? curve.points.numberOfItems : 0;
  const band = document.querySelector('svg.curve rect.band');
  document.title = `images ${ok}/${imgs.length} curve ${points} width ${Math.round(box.width)} band ${band ? 1 : 0}`;
});
</script>"""


def test_report_renders_in_headless_chromium_with_images_and_curve(job, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("LORASMITH_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed (apt-get install chromium); .ci/run installs it")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    _, out = job
    page = tmp_path / "page.html"
    page.write_text((out / "test.report.html").read_text(encoding="utf-8").replace("</body>", CHECK + "</body>"),
                    encoding="utf-8")
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    assert "<title>images 3/3 curve 27 width " in dom, dom[:500]
    assert " band 0</title>" in dom  # the tiny base is no public SD1.x: SD1.5's healthy band is not drawn
    width = int(dom.split(" width ")[1].split()[0])
    assert width > 500  # the average spans the plot (27 of 27 steps)
    assert dom.count('src="data:image/jpeg;base64,') == 3  # inlined: the page needs no other file
    assert "epoch 1 · step 9" in dom and "epoch 3 · step 27" in dom

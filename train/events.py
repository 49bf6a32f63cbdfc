"""What happens between optimizer steps: states, samples, validation, logs, saves and the report.

A mixin of `Trainer`, so the training loop reads as the life cycle and this file as the schedule of side
work; what a sample or a validation loss is comes from `previews.Previews`, which receives the conditioning,
objective and latents it uses. Everything here that draws random numbers uses its own generator or restores
the global one, so a run with samples and validation trains exactly the same weights as one without, and a
resumed run the same as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from lorasmith.train.state import (SaveError, StateError, check_adapters, clear_temps, latest, new_run_id, state_root,
                                   storage_error, write_state)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: training stops before the step's update is applied."""

    def __init__(self, step: int, value: float, config):
        self.step, self.value = step, value
        t, o = config.training, config.optimizer
        self.short = f"the loss became {value} at step {step}"
        hints = [f"a learning rate too high (optimizer.learning_rate = {o.learning_rate:g}; try a third of it)",
                 "if it recurs at a lower rate, a damaged picture (run prep-images again)"]
        if t.mixed_precision == "fp16":
            hints.insert(0, 'fp16 overflow: set training.mixed_precision = "bf16" (RTX 30xx and newer) or "no"')
        super().__init__(f"{self.short}. Likely causes: {'; '.join(hints)}.")


class Preempted(Exception):
    """SIGTERM or SIGINT: the state is written and the process should exit with PREEMPTED_EXIT."""

    def __init__(self, signal_name: str, step: int, state: Path | None):
        self.signal_name, self.step, self.state = signal_name, step, state
        where = f"state saved in {state}" if state else "no state saved (output.save_state = false)"
        super().__init__(f"stopped by {signal_name} after step {step}; {where}")


@dataclass
class RunPaths:
    states: Path
    samples: Path
    logs: Path
    report: Path

    @classmethod
    def of(cls, config) -> RunPaths:
        out, name = Path(config.output.output_dir), config.output.output_name
        return cls(state_root(out, name), out / f"{name}.samples", out / f"{name}.logs", out / f"{name}.report.html")


class RunEvents:
    """Needs from Trainer: config, plan, dataset, accelerator, device, adapted (the models with adapters, by name,
    the UNet first), family, previews, optimizer, lr_scheduler, generator, rng, result, log, save()."""

    def setup_events(self) -> None:
        from lorasmith.common.prompts import read_prompts

        self.paths = RunPaths.of(self.config)
        self.history = {"loss": [], "validation": [], "samples": [], "saves": []}
        self.step, self.position = 0, (1, 0)
        self.run_id = new_run_id()
        self.forced = False
        """Resumed with --force despite changes: the data position no longer follows from the step alone."""
        self.saved_states: dict[int, Path | None] = {}
        self.times: dict[str, list[float]] = {"state save": [], "sampling": [], "validation": [], "report": []}
        self.result.events = self.times
        self.last_sampled = self.last_validated = None
        self.signals = None
        self.grid_uris: dict[Path, str] = {}
        self.loss_band = None
        """The base's healthy loss band for the report (set by `load`; None when none applies)."""
        self.prompts = []
        if self.config.sample.sample_prompts:
            self.prompts, warnings = read_prompts(Path(self.config.sample.sample_prompts))
            for warning in warnings if os.environ.get("RANK", "0") == "0" else ():  # once, not per process
                self.log(f"warning: {warning} (skipped)")

    def prompt_texts(self) -> set[str]:
        return {text for p in self.prompts for text in (p.prompt, p.negative)}

    def agree(self, flag: bool) -> bool:
        """True when any process says so; all processes then take the same branch."""
        if self.accelerator.num_processes == 1:
            return flag
        import torch

        return bool(self.accelerator.reduce(torch.tensor([float(flag)], device=self.device), "max").item())

    def _timed(self, kind: str, started: float) -> None:
        self.times[kind].append(time.perf_counter() - started)

    # -- the schedule -----------------------------------------------------------------------------------
    def record(self, epoch: int, loss: float) -> None:
        lr = self.lr_scheduler.get_last_lr()[0]
        self.result.losses.append(loss)
        self.history["loss"].append([self.step, epoch, loss, lr])
        if self.accelerator.is_main_process:
            with self.writing(self.paths.logs / "loss.csv"):
                self.runlog.step(self.step, epoch, loss, lr)

    def at_start(self) -> None:
        if self.config.sample.sample_at_first:
            self.sample(0)
        if self.dataset.validation:
            self.validate(0)

    def after_step(self, epoch: int) -> None:
        o, s = self.config.output, self.config.sample
        if self.agree(self.signals is not None and self.signals.requested is not None):
            self.preempt()
        done = self.step >= self.plan.total_steps
        if s.sample_every_n_steps and self.step % s.sample_every_n_steps == 0:
            self.sample(epoch)
        if o.save_state and o.save_state_every_n_steps and self.step % o.save_state_every_n_steps == 0 and not done:
            self.save_state()
            self.write_report(self.running_status())

    def after_epoch(self, epoch: int) -> None:
        o, s = self.config.output, self.config.sample
        if self.dataset.validation:
            self.validate(epoch)
        if s.sample_every_n_epochs and epoch % s.sample_every_n_epochs == 0:
            self.sample(epoch)
        if epoch in self.plan.save_epochs and self.step < self.plan.total_steps:
            self.save(epoch, self.step, final=False)
            if o.save_state:
                self.save_state()
            self.write_report(self.running_status())
        if self.agree(self.signals is not None and self.signals.requested is not None):
            self.preempt()

    def current_epoch(self) -> int:
        """The epoch the last step belonged to (the position points past a finished epoch)."""
        epoch, done = self.position
        return epoch if done else epoch - 1

    def at_end(self) -> None:
        if self.dataset.validation and self.last_validated != self.step:
            self.validate(self.current_epoch())
        if self.prompts and self.last_sampled != self.step:
            self.sample(self.current_epoch())

    def finish(self) -> None:
        """The final LoRA, a final state (to train on later with --resume --force) and the finished report."""
        epoch = min(self.plan.epochs, self.current_epoch()) or 1
        started = time.perf_counter()
        self.save(epoch, self.step, final=True)
        save_time = time.perf_counter() - started
        if self.config.output.save_state:
            self.save_state()
        self.result.timings["save"] = save_time
        self.write_report(f"finished: {self.step} steps, {epoch} epoch(s)", final=True)

    def running_status(self) -> str:
        return f"in progress: step {self.step} of {self.plan.total_steps} (this page is refreshed at every save)"

    # -- states -----------------------------------------------------------------------------------------
    def last_state(self) -> Path | None:
        """This run's newest complete state."""
        return latest(self.paths.states, self.run_id)

    @contextlib.contextmanager
    def writing(self, path: Path):
        """A failed write (a full disk, a folder made read-only) as one SaveError naming the file."""
        try:
            yield
        except SaveError:
            raise
        except OSError as exc:
            raise storage_error(exc, Path(exc.filename) if exc.filename else path, self.last_state()) from None

    def clear_leftovers(self) -> None:
        """Temporary files and folders that killed processes left among this run's outputs."""
        from lorasmith.common.files import clear_stale_parts

        cache = Path(self.config.dataset.train_data_dir) / ".latent_cache"
        for folder in (Path(self.config.output.output_dir), self.paths.samples, self.paths.logs, cache):
            clear_stale_parts(folder)
        clear_temps(self.paths.states)

    def _adapters(self) -> dict:
        """Trainable tensors by a stable name: `unet.<peft name>`, `text_encoder.<peft name>` (and `text_encoder_2.`
        for SDXL)."""
        from lorasmith.train.network import is_adapter

        return {f"{prefix}.{name}": p for prefix, model in self.adapted.items()
                for name, p in self.accelerator.unwrap_model(model).named_parameters() if is_adapter(name)}

    def _rng_state(self) -> dict:
        import torch

        state = {"generator": self.generator.get_state(), "python": self.rng.getstate(),
                 "global_python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def save_state(self) -> Path | None:
        """Everything needed to continue bit-identically: adapters, optimizer, schedule, every process's
        RNG states, the data position and the history for logs and the report."""
        import torch
        from accelerate.utils import gather_object
        from safetensors.torch import save

        from lorasmith.train.state import config_fingerprint, dataset_fingerprint

        if self.step in self.saved_states:  # e.g. SIGTERM right after a periodic save: nothing new to write
            return self.saved_states[self.step]
        started = time.perf_counter()
        rngs = [self._rng_state()]
        if self.accelerator.num_processes > 1:
            rngs = gather_object(rngs)
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            self.saved_states[self.step] = None  # every process must skip a repeated save alike
            return None
        adapters = {name: p.detach().to("cpu", torch.float32).contiguous() for name, p in self._adapters().items()}
        buffer = io.BytesIO()
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.lr_scheduler.state_dict(),
                    "rng": rngs}, buffer)
        info = {"epoch": self.position[0], "position": list(self.position), "processes": self.plan.processes,
                "per_process": -(-self.plan.batches_per_epoch // self.plan.processes),
                "accumulation": self.plan.accumulation, "forced": self.forced,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "config": config_fingerprint(self.config, self.plan.processes),
                "dataset": dataset_fingerprint(self.dataset)}
        files = {"adapters.safetensors": save(adapters), "training.pt": buffer.getvalue(),
                 "history.json": json.dumps(self.history).encode()}
        folder = write_state(self.paths.states, self.step, files, info, self.config.output.save_last_n_states,
                             self.run_id)
        self.saved_states[self.step] = folder
        self.result.states.append(folder)
        self._timed("state save", started)
        return folder

    def restore(self, loaded) -> None:
        import torch

        started = time.perf_counter()
        self.run_id = loaded.manifest.get("run") or self.run_id  # a resumed run goes on as the same run
        self.forced = loaded.forced or bool(loaded.manifest.get("forced"))
        params = self._adapters()
        check_adapters(loaded, params)
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(loaded.adapters[name].to(param.device, param.dtype))
        t = loaded.training
        try:
            self.optimizer.load_state_dict(t["optimizer"])
            self.lr_scheduler.load_state_dict(t["scheduler"])
            rank = self.accelerator.process_index
            rng = t["rng"][rank] if rank < len(t["rng"]) else t["rng"][0]
            self.generator.set_state(rng["generator"])
            self.rng.setstate(rng["python"])
            random.setstate(rng["global_python"])
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            raise StateError(f"{loaded.folder / 'training.pt'} does not fit this run ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}); resume from another state or start "
                             "afresh") from None
        self.step, self.position = loaded.manifest["step"], tuple(loaded.manifest["position"])
        self.history = {key: loaded.history.get(key, []) for key in self.history}
        self.result.losses = [row[2] for row in self.history["loss"]]
        self.result.validation = [row[2] for row in self.history["validation"]]
        self.last_sampled = self.history["samples"][-1]["step"] if self.history["samples"] else None
        self.last_validated = self.history["validation"][-1][0] if self.history["validation"] else None
        self.result.timings["state load"] = loaded.seconds + time.perf_counter() - started
        if self.accelerator.is_main_process:
            self.log(f"resumed from {loaded.folder} at step {self.step} (epoch {self.position[0]}, "
                     f"batch {self.position[1]} of the epoch done)")

    def preempt(self) -> None:
        name = self.signals.name if self.signals and self.signals.requested else "a signal"
        folder = self.save_state() if self.config.output.save_state else None
        self.write_report(f"stopped by {name} at step {self.step} of {self.plan.total_steps}; "
                          f"continue with: train-lora <preset> --resume auto")
        raise Preempted(name, self.step, folder)

    # -- validation and samples -------------------------------------------------------------------------
    def validate(self, epoch: int) -> float | None:
        if not self.accelerator.is_main_process:
            return None
        from lorasmith.train.previews import evaluating

        started = time.perf_counter()
        models = [self.accelerator.unwrap_model(m) for m in self.adapted.values()]
        with evaluating(models):
            value = self.previews.validation_loss(models[0], self.dataset.validation)
        self.history["validation"].append([self.step, epoch, value])
        self.result.validation.append(value)
        with self.writing(self.paths.logs / "validation.csv"):
            self.runlog.validation(self.step, epoch, value)
        self.last_validated = self.step
        self._timed("validation", started)
        return value

    def sample(self, epoch: int) -> list[Path]:
        """One picture per prompt with the LoRA as it is now, and their grid."""
        from lorasmith.common.files import atomic_writer, make_output_folder
        from lorasmith.train.previews import evaluating
        from lorasmith.models.sampling import make_grid

        self.last_sampled = self.step
        if not self.prompts or not self.accelerator.is_main_process:
            return []
        started = time.perf_counter()
        models = [self.accelerator.unwrap_model(m) for m in self.adapted.values()]
        with evaluating(models):
            images = self.previews.pictures(models[0], self.prompts)
        tag = f"e{epoch:06d}-s{self.step:08d}"
        paths = [self.paths.samples / f"{tag}-{i:02d}.png" for i in range(len(images))]
        with self.writing(self.paths.samples):
            make_output_folder(self.paths.samples)
        for image, path in zip(images, paths):
            with self.writing(path), atomic_writer(path) as handle:
                image.save(handle, "PNG")
        title = f"epoch {epoch} · step {self.step}" + (f" · loss {self.recent_loss():.4f}" if self.step else "")
        grid = make_grid(images, [p.prompt for p in self.prompts], title)
        grid_path = self.paths.samples / f"{tag}-grid.png"
        with self.writing(grid_path), atomic_writer(grid_path) as handle:
            grid.save(handle, "PNG")
        self.history["samples"].append({"step": self.step, "epoch": epoch, "grid": grid_path.name,
                                        "images": [p.name for p in paths]})
        self._timed("sampling", started)
        return paths

    def recent_loss(self) -> float:
        window = self.result.losses[-25:]
        return sum(window) / len(window) if window else math.nan

    # -- logs and the report ----------------------------------------------------------------------------
    def open_log(self) -> None:
        from lorasmith.train.logs import RunLog

        self.runlog = RunLog(self.paths.logs, self.accelerator)
        if self.accelerator.is_main_process:
            with self.writing(self.paths.logs / "loss.csv"):
                self.runlog.open(self.history, self.config.output.output_name)

    def close_log(self) -> None:
        if self.accelerator.is_main_process:
            self.runlog.close()

    def write_report(self, status: str, final: bool = False) -> Path | None:
        from lorasmith.common.files import write_text_atomic
        from lorasmith.train.config import to_toml
        from lorasmith.train.report import ReportData, image_uri, render

        if not self.accelerator.is_main_process:
            return None
        started = time.perf_counter()
        out, name = Path(self.config.output.output_dir), self.config.output.output_name
        grids = []
        for event in self.history["samples"]:
            path = self.paths.samples / event["grid"]
            if path not in self.grid_uris and path.is_file():  # encoded once, not at every refresh
                self.grid_uris[path] = image_uri(path)
            if path in self.grid_uris:
                grids.append((f"epoch {event['epoch']} · step {event['step']}", event["epoch"], self.grid_uris[path]))
        outputs = [(p.name, p.stat().st_size) for p in sorted(out.glob(f"{name}*.safetensors"))]
        for folder in sorted(self.paths.states.glob("step-*")) if self.paths.states.is_dir() else ():
            outputs.append((f"{self.paths.states.name}/{folder.name} (state)",
                            sum(f.stat().st_size for f in folder.iterdir())))
        timings = {k: v for k, v in self.result.timings.items()}
        timings.update({f"{k} ({len(v)}×)": sum(v) for k, v in self.times.items() if v})
        d = self.dataset
        lines = [f"{folder}: {repeats} repeats" for folder, repeats in d.folders.items()]
        lines += [f"{len(d.items)} training pictures, {len(d.validation)} held out for validation, "
                  f"{len(d.reg_items)} regularisation pictures"]
        data = ReportData(f"{name}: train-lora report", status, to_toml(self.config), self.plan.lines(), lines,
                          self.history["loss"], self.history["validation"], self.plan.total_steps, timings, outputs,
                          grids, {epoch: file for epoch, _, file in self.history["saves"]}, self.loss_band,
                          self.family.label if self.loss_band else "")
        with self.writing(self.paths.report):
            write_text_atomic(self.paths.report, render(data))
        self.result.report = self.paths.report
        if not final:
            self._timed("report", started)
        return self.paths.report

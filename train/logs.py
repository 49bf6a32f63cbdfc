"""Loss logging: a CSV row per step (always), TensorBoard through accelerate's tracker when installed.

The run's history also lives in memory and in every saved state, so a resumed run first rewrites the CSV
files from the state (dropping rows a killed process wrote after it) and then appends.
"""

from __future__ import annotations

import csv
from pathlib import Path

from lorasmith.common.files import atomic_writer, make_output_folder

LOSS_HEADER = ["step", "epoch", "loss", "lr"]
VALIDATION_HEADER = ["step", "epoch", "validation_loss"]


def loss_row(step: int, epoch: int, loss: float, lr: float) -> list:
    return [step, epoch, repr(loss), f"{lr:.6g}"]


def validation_row(step: int, epoch: int, loss: float) -> list:
    return [step, epoch, repr(loss)]


def tensorboard_available() -> bool:
    from accelerate.utils import is_tensorboard_available

    return is_tensorboard_available()


class RunLog:
    def __init__(self, folder: Path, accelerator=None):
        self.folder = folder
        self.accelerator = accelerator
        self.tracking = bool(accelerator is not None and accelerator.log_with)
        self.loss_file = self.validation_file = None

    def open(self, history: dict, project: str) -> None:
        """Rewrite both CSV files from `history`, then keep them open for appending."""
        make_output_folder(self.folder)
        for name, header, rows in (("loss.csv", LOSS_HEADER, [loss_row(*r) for r in history["loss"]]),
                                   ("validation.csv", VALIDATION_HEADER,
                                    [validation_row(*r) for r in history["validation"]])):
            with atomic_writer(self.folder / name, "w") as handle:
                writer = csv.writer(handle)
                writer.writerow(header)
                writer.writerows(rows)
        self.loss_file = open(self.folder / "loss.csv", "a", encoding="utf-8", newline="")
        self.validation_file = open(self.folder / "validation.csv", "a", encoding="utf-8", newline="")
        if self.tracking:
            self.accelerator.init_trackers(project)

    def step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        csv.writer(self.loss_file).writerow(loss_row(step, epoch, loss, lr))
        self.loss_file.flush()
        if self.tracking:
            self.accelerator.log({"loss/train": loss, "lr/unet": lr}, step=step)

    def validation(self, step: int, epoch: int, loss: float) -> None:
        csv.writer(self.validation_file).writerow(validation_row(step, epoch, loss))
        self.validation_file.flush()
        if self.tracking:
            self.accelerator.log({"loss/validation": loss}, step=step)

    def close(self) -> None:
        for handle in (self.loss_file, self.validation_file):
            if handle is not None:
                handle.close()
        self.loss_file = self.validation_file = None
        if self.tracking:  # not accelerator.end_training(): it also ends the process group the save needs
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.tracking = False

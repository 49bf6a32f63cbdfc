"""The WD14 tagger (SmilingWolf's ONNX models) as a captioner: booru tags above a confidence threshold."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from lorasmith.common.hub import ModelNotFound, load_model
from lorasmith.common.captions import clean_tag

DEFAULT_WD14 = "SmilingWolf/wd-v1-4-convnext-tagger-v2"
RATING, GENERAL, CHARACTER = 9, 0, 4
"""Categories in selected_tags.csv."""


@dataclass(frozen=True)
class Wd14Settings:
    model: str = DEFAULT_WD14
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    undesired_tags: tuple[str, ...] = ()
    underscores_to_spaces: bool = True
    rating_tags: bool = False


def _download(name: str, local_files_only: bool = False) -> str:
    """A folder holding model.onnx and selected_tags.csv: the folder itself, or the hub snapshot."""
    if Path(name).is_dir():
        folder = Path(name)
    else:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name, allow_patterns=["model.onnx", "selected_tags.csv"],
                                        local_files_only=local_files_only))
    missing = [f for f in ("model.onnx", "selected_tags.csv") if not (folder / f).is_file()]
    if missing:
        raise OSError(f"missing {', '.join(missing)}")
    return str(folder)


def preprocess(image: Image.Image, size: int):
    """Kohya's and SmilingWolf's recipe: pad to a white square, resize, BGR, float 0-255, NHWC."""
    import numpy as np

    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    resample = Image.Resampling.BOX if side > size else Image.Resampling.LANCZOS
    array = np.asarray(square.resize((size, size), resample), dtype=np.float32)
    return array[:, :, ::-1]


class Wd14Tagger:
    name = "wd14"

    def __init__(self, settings: Wd14Settings, device: str = "auto"):
        try:
            import onnxruntime
        except ModuleNotFoundError:
            raise ModelNotFound("the WD14 tagger needs onnxruntime: pip install 'lorasmith[wd14]' "
                                "(or onnxruntime-gpu on a CUDA machine)") from None
        self.settings = settings
        folder = Path(load_model(settings.model, _download, "WD14 tagger"))
        providers = ["CPUExecutionProvider"]
        if device != "cpu" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=providers)
        model_input = self.session.get_inputs()[0]
        self.input_name, self.input_size = model_input.name, int(model_input.shape[1])
        with open(folder / "selected_tags.csv", newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        self.tags = [(row["name"], int(row["category"])) for row in rows]
        undesired = {clean_tag(t, settings.underscores_to_spaces) for t in settings.undesired_tags}
        self.undesired = undesired

    def tag(self, images: list[Image.Image]) -> list[list[str]]:
        import numpy as np

        batch = np.stack([preprocess(image, self.input_size) for image in images])
        (probs,) = self.session.run(None, {self.input_name: batch})
        return [self._select(row) for row in probs]

    def _select(self, probs) -> list[str]:
        s = self.settings
        scored = {RATING: [], CHARACTER: [], GENERAL: []}
        for (name, category), p in zip(self.tags, probs):
            if category == RATING:
                scored[RATING].append((p, name))
            elif category in scored and p >= (s.character_threshold if category == CHARACTER else s.general_threshold):
                scored[category].append((p, name))
        chosen = [n for _, n in sorted(scored[CHARACTER], reverse=True)]
        chosen += [n for _, n in sorted(scored[GENERAL], reverse=True)]
        if s.rating_tags and scored[RATING]:
            chosen.append(max(scored[RATING])[1])
        cleaned = [clean_tag(t, s.underscores_to_spaces) for t in chosen]
        return [t for t in cleaned if t not in self.undesired]

    def caption(self, images: list[Image.Image]) -> list[str]:
        return [", ".join(tags) for tags in self.tag(images)]

"""The WD14 path on a tiny ONNX tagger whose answers follow from its weights.

The model averages each BGR channel and maps the means to tag logits, so a pure blue picture must raise
`blue_background` and a red one `red_theme`: a tagger fed RGB instead of BGR gets them backwards.
"""

import csv
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from lorasmith.models.wd14 import Wd14Settings, Wd14Tagger, preprocess

BIN = Path(sys.executable).parent
TAGS = [  # name, category, weights on mean (B, G, R) in 0..1, bias
    ("general", 9, (0, 0, 0), 2.0),
    ("sensitive", 9, (0, 0, 0), -2.0),
    ("hatsune_miku", 4, (8, 0, 0), -5.0),  # character: only very blue pictures
    ("blue_background", 0, (8, 0, 0), -3.0),
    ("red_theme", 0, (0, 0, 8), -3.0),
    ("^_^", 0, (0, 0, 0), 1.0),  # always on: a kaomoji keeps its underscore
    ("simple_background", 0, (0, 0, 0), 0.5),  # always on, sigmoid 0.62
]


def build_tagger(folder: Path, size: int = 32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    weights = np.array([t[2] for t in TAGS], dtype=np.float32).T  # (3, T)
    bias = np.array([t[3] for t in TAGS], dtype=np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("Div", ["mean", "scale"], ["unit"]),
        helper.make_node("MatMul", ["unit", "W"], ["logits0"]),
        helper.make_node("Add", ["logits0", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny-wd14",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", len(TAGS)])],
        initializer=[
            helper.make_tensor("scale", TensorProto.FLOAT, [], [255.0]),
            helper.make_tensor("W", TensorProto.FLOAT, weights.shape, weights.flatten()),
            helper.make_tensor("b", TensorProto.FLOAT, bias.shape, bias),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    with open(folder / "selected_tags.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        writer.writerows([i, name, category, 100] for i, (name, category, _, _) in enumerate(TAGS))
    return folder


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory):
    return build_tagger(tmp_path_factory.mktemp("wd14"))


BLUE, RED = Image.new("RGB", (50, 40), (0, 0, 255)), Image.new("RGB", (40, 50), (255, 0, 0))


def test_preprocess_is_bgr_padded_white_nhwc():
    array = preprocess(Image.new("RGB", (20, 10), (255, 0, 0)), 16)
    assert array.shape == (16, 16, 3) and array.dtype == np.float32
    assert tuple(array[8, 8]) == (0.0, 0.0, 255.0)  # red, in BGR order
    assert tuple(array[0, 8]) == (255.0, 255.0, 255.0)  # white padding above


@pytest.mark.parametrize(
    "settings, blue, red",
    [
        (Wd14Settings(), ["hatsune miku", "blue background", "^_^", "simple background"], ["red theme", "^_^", "simple background"]),
        (Wd14Settings(general_threshold=0.7), ["hatsune miku", "blue background", "^_^"], ["red theme", "^_^"]),
        (Wd14Settings(character_threshold=0.99), ["blue background", "^_^", "simple background"], None),
        (Wd14Settings(underscores_to_spaces=False), ["hatsune_miku", "blue_background", "^_^", "simple_background"], None),
        (Wd14Settings(undesired_tags=("simple_background", "^_^")), ["hatsune miku", "blue background"], ["red theme"]),
        (Wd14Settings(rating_tags=True), ["hatsune miku", "blue background", "^_^", "simple background", "general"], None),
    ],
)
def test_tags_follow_thresholds_and_options(tagger_dir, settings, blue, red):
    tagger = Wd14Tagger(replace(settings, model=str(tagger_dir)), "cpu")
    got_blue, got_red = tagger.tag([BLUE, RED])
    assert got_blue == blue
    if red is not None:
        assert got_red == red


def test_cli_wd14_and_blip_plus_wd14(tmp_path, tagger_dir, tiny_blip):
    folder = tmp_path / "10_x"
    folder.mkdir()
    BLUE.save(folder / "blue.png")
    RED.save(folder / "red.png")
    base = [str(BIN / "caption-folder"), str(folder), "--prefix", "sks", "--wd14-model", str(tagger_dir), "--quiet"]
    done = subprocess.run([*base, "--captioner", "wd14"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (folder / "blue.txt").read_text(encoding="utf-8") == "sks, hatsune miku, blue background, ^_^, simple background\n"
    done = subprocess.run([*base, "--captioner", "blip+wd14", "--overwrite", "--model", str(tiny_blip),
                           "--beam-search", "--max-length", "10"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    parts = (folder / "red.txt").read_text(encoding="utf-8").strip().split(", ")
    assert parts[0] == "sks" and parts[-3:] == ["red theme", "^_^", "simple background"] and len(parts) == 5

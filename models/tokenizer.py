"""CLIP's BPE tokenizer, shipped with lorasmith: a single-file checkpoint holds no tokenizer, and the hub that
serves one may be out of reach. `scripts/build_clip_tokenizer.py` made the files from open_clip's BPE list.

SD1.x's tokenizer pads with `<|endoftext|>`; SD2.x's and SDXL's second tokenizer (OpenCLIP) pad with `!`.
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).with_name("clip")
OPENCLIP_PAD = "!"


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The tokenizer every Stable Diffusion family uses, 77 positions, from the files in `clip/`."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(FOLDER / "vocab.json"), str(FOLDER / "merges.txt"), pad_token=pad_token,
                         model_max_length=77)

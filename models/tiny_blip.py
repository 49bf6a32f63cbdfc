"""A randomly initialised BLIP built from a config, saved as a normal model folder.

It proves the install and the plumbing (smoke runs, tests, benchmarks) without downloading anything; its
captions are word salad. `size="large"` builds the real BLIP-large architecture for timing.
"""

from __future__ import annotations

from pathlib import Path

WORDS = ("a an the of on in with and clay claymation red blue green yellow purple teal ball blob cube snail "
         "figure toy small big soft round shiny matte table background white studio photo picture sitting").split()

SIZES = {
    # hidden, layers, heads, intermediate, image size, patch, text hidden, text layers, text heads, positions
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                             image_size=32, patch_size=8),
                 text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=96)),
    "large": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=384, patch_size=16),
                  text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            max_position_embeddings=512)),
}


def build_blip(folder: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight BLIP captioning model and its processor to `folder`; returns `folder`."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    try:  # transformers 5 without torchvision: the Pillow processor, named so it does not warn
        from transformers.models.blip import BlipImageProcessorPil as BlipImageProcessor
    except ImportError:
        from transformers.models.blip import BlipImageProcessor

    from lorasmith.models.blip import quiet_transformers

    quiet_transformers()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    # transformers 5's BertTokenizer ignores vocab_file; an in-memory vocab is the reliable way.
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]")
    spec = SIZES[size]
    # A raised text init range keeps random captions image-dependent; at 0.02 every image gets the same words.
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab) if size == "tiny" else 30524, initializer_range=0.2,
                         bos_token_id=vocab["[DEC]"], sep_token_id=vocab["[SEP]"], pad_token_id=0, **spec["text"]),
        vision_config=dict(initializer_range=0.02, **spec["vision"]),
        projection_dim=spec["text"]["hidden_size"],
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    side = spec["vision"]["image_size"]
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": side, "width": side}),
                              tokenizer=tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def model_cli(argv, prog: str, doc: str, sizes, marker: str, build, what: str) -> int:
    """`python -m ...tiny FOLDER [--size]`: build a random-weight model unless FOLDER already holds one."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=doc)
    parser.add_argument("folder", type=Path, help="where to write the model folder")
    parser.add_argument("--size", choices=sorted(sizes), default="tiny")
    args = parser.parse_args(argv)
    if (args.folder / marker).exists():
        print(f"{args.folder} already holds a model; kept")
        return 0
    build(args.folder, args.size)
    print(f"random-weight {what} ({args.size}) written to {args.folder}: for smoke runs, not real use")
    return 0


def main(argv: list[str] | None = None) -> int:
    return model_cli(argv, "python -m lorasmith.models.tiny_blip", __doc__, SIZES, "config.json", build_blip, "BLIP")


if __name__ == "__main__":
    raise SystemExit(main())

"""Whether a picture of the size asked for can be drawn here, answered before any model loads: a 100,000-pixel
side would otherwise run for minutes and end in the kernel's out-of-memory killer."""

from __future__ import annotations

from pathlib import Path

DECODER_CHANNELS = 128
"""SD's VAE runs its last decoder blocks at full resolution with 128 channels (SD1/2/XL alike)."""
LIVE_TENSORS = 4
"""Full-resolution tensors alive at once in one of those ResNet blocks: input, normalised, convolved, residual."""


def picture_bytes(width: int, height: int, dtype_bytes: int = 4) -> int:
    """Peak working memory of one picture: the VAE decoding it at full resolution, the largest step at SD's
    sizes (the UNet works at 1/8 of each side)."""
    return width * height * DECODER_CHANNELS * LIVE_TENSORS * dtype_bytes


def available_bytes(device: str) -> int | None:
    """Memory free for a new picture on `device`: free CUDA memory, or the kernel's MemAvailable; None when
    unknown."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def too_big(width: int, height: int, dtype_bytes: int, available: int | None) -> str:
    """'' when a width × height picture fits in `available` bytes; else the sentence that says it does not."""
    needed = picture_bytes(width, height, dtype_bytes)
    if available is None or needed <= available:
        return ""
    side = int((available / (DECODER_CHANNELS * LIVE_TENSORS * dtype_bytes)) ** 0.5) // 64 * 64
    return (f"a {width}×{height} picture needs about {needed / 2**30:.1f} GiB while the VAE decodes it, and "
            f"{available / 2**30:.1f} GiB is available: draw at most about {side}×{side} (--w/--h) and upscale")

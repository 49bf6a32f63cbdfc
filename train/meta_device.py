"""What the meta device lacks for a training step to look as it does on a GPU, and the counter that measures it.

- `Autocast`: autocast has no meta backend, so this TorchFunctionMode (above autograd, so its casts are
  recorded as autocast's are) applies CUDA's autocast lists: matmuls, convolutions and attention in fp16/bf16;
  norms, softmax and losses in fp32. `device_type="cpu"` applies CPU's lists (norms stay in bf16). It also sends
  attention to a fused kernel: on meta, scaled_dot_product_attention would take the math path and keep the whole
  attention matrix for backward, where GPUs take flash or memory-efficient attention.
- `LiveBytes`: a TorchDispatchMode that sees every tensor every op returns (forward, backward and the
  recomputation of gradient checkpointing) and keeps a weak reference to its storage: bytes count from the
  moment a storage first appears until it is freed, so `peak` is what `torch.cuda.max_memory_allocated` reports,
  without the caching allocator's rounding. It counts FLOPs with `torch.utils.flop_counter`'s formulas, plus
  the CPU flash-attention kernel torch's table lacks. On real CPU tensors it measures a real step
  (bench/preflight_bench.py).
- `_run_meta`: many meta results are computed by Python functions in torch; a UNet repeats the same ops on the
  same shapes, so their output shapes are remembered and rebuilt as empty meta tensors (views and in-place ops
  always run as they are).
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

LOWER_PRECISION = {"linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                   "conv_transpose3d", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm",
                   "addbmm", "einsum", "scaled_dot_product_attention"}
"""Functions autocast runs in fp16/bf16, on CUDA and CPU alike (PyTorch's "Autocast Op Reference")."""
FP32 = {"cuda": {"group_norm", "layer_norm", "softmax", "log_softmax", "mse_loss"}, "cpu": {"mse_loss"}}
"""Functions autocast runs in fp32: CUDA's list has the norms and softmax; CPU's keeps them in bf16."""


class Autocast(TorchFunctionMode):
    """What the GPU does that the meta device would not: cast as torch.autocast does on `device_type` ("cuda" or
    "cpu"; `dtype` None casts nothing), and run attention in a fused kernel. On meta, scaled_dot_product_attention
    would take the math path and keep the whole attention matrix for backward (gigabytes at SD's 4096 tokens);
    GPUs take flash or memory-efficient attention, which keep q, k, v, the output and one log-sum-exp row, as
    the CPU flash kernel that attention is sent to here does."""

    def __init__(self, dtype=None, device_type: str = "cuda"):
        super().__init__()
        self.dtype, self.fp32 = dtype, FP32[device_type]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        want = self.dtype if name in LOWER_PRECISION else torch.float32 if name in self.fp32 else None
        if want is not None and self.dtype is not None:
            cast = functools.partial(_cast, want)
            args, kwargs = tuple(map(cast, args)), {k: cast(v) for k, v in kwargs.items()}
        if name == "scaled_dot_product_attention" and (args[0] if args else kwargs["query"]).device.type == "meta":
            return _fused_attention(*args, **kwargs)
        return func(*args, **kwargs)


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


def _cast(dtype, value):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    return value


def _cpu_flash(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


FORMULAS = {**flop_registry, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward}
"""torch's FLOP formulas, plus the CPU flash-attention kernel that attention takes on the meta device."""


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages alive now (`now`) and at most (`peak`), the FLOPs of the ops seen (`flops`) and how
    many ops ran (`ops`). Tensors made before the mode was entered are added with `track`."""

    def __init__(self):
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.now = self.peak = self.flops = self.ops = 0

    def track(self, *tensors) -> None:
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self.sizes:
                continue
            self.sizes[key] = size = storage.nbytes()
            self.now += size
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._freed, key)

    def _freed(self, key: int) -> None:
        self.now -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = _run_meta(func, args, kwargs)
        self.ops += 1
        formula = FORMULAS.get(func._overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        self.track(*tree_flatten(out)[0])
        return out


_SHAPES: dict = {}
"""Output metadata of meta ops by op and input metadata: a UNet repeats the same ops on the same shapes (SDXL's
ten identical blocks per level, forward and recomputation), and torch computes many meta results in Python."""


def _describe(value):
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.stride(), value.dtype, value.device.type, value.storage_offset())
    if isinstance(value, (list, tuple)):
        return tuple(map(_describe, value))
    return value if isinstance(value, (int, float, bool, str, type(None), torch.dtype, torch.device,
                                       torch.layout, torch.memory_format)) else _Uncacheable


class _Uncacheable:
    pass


def _fresh_outputs(func) -> bool:
    """Ops whose results are new tensors (no view, no in-place or out= result): safe to rebuild from metadata."""
    schema = func._schema
    return not schema.is_mutable and all(r.alias_info is None for r in schema.returns)


def _run_meta(func, args, kwargs):
    """`func` on meta tensors, from the memo of output metadata when these input shapes were seen before; new
    empty meta tensors with the remembered shapes and strides stand for the outputs (no storage either way)."""
    flat = tree_flatten((args, kwargs))[0]
    devices = {t.device.type for t in flat if isinstance(t, torch.Tensor)}
    if devices != {"meta"} or not _fresh_outputs(func):  # factory ops (no tensor in) run as they are: cheap
        return func(*args, **kwargs)
    key = (func, _describe(flat))
    if _Uncacheable in tree_flatten(key[1])[0]:
        return func(*args, **kwargs)
    spec = _SHAPES.get(key)
    if spec is None:
        out = func(*args, **kwargs)
        leaves, tree = tree_flatten(out)
        _SHAPES[key] = (tree, [(tuple(t.shape), t.stride(), t.dtype) if isinstance(t, torch.Tensor) else ("V", t)
                               for t in leaves])
        return out
    tree, leaves = spec
    made = [leaf[1] if leaf[0] == "V" else torch.empty_strided(leaf[0], leaf[1], dtype=leaf[2], device="meta")
            for leaf in leaves]
    return tree_unflatten(made, tree)


def checkpointing(recompute_context):
    """A gradient-checkpointing function (for diffusers' `enable_gradient_checkpointing` and transformers'
    kwargs) that recomputes under `recompute_context()`: torch's non-reentrant checkpoint, as both libraries use
    by default, with the mixed-precision mode active again during the backward pass's recomputation."""
    from torch.utils.checkpoint import checkpoint

    def context():
        return contextlib.nullcontext(), recompute_context()

    def run(module, *args):
        return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=context)

    return run, {"use_reentrant": False, "context_fn": context}


def meta_build(factory):
    """`factory()` with every parameter and buffer it registers moved to the meta device as it is registered
    (accelerate's init_empty_weights): initialisers then run on meta, so the full SDXL UNet builds in a fraction
    of a second. `torch.device("meta")` as a context does the same for every tensor but routes every torch call of
    the build through Python, ~20× slower."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        return factory()

"""An 8-bit float KV cache: what is stored, how it is scaled, and the PyTorch reference for both.

With kv_cache_dtype="fp8" (= "fp8_e4m3") or "fp8_e5m2" each pool element is one byte:

    stored = fp8(clamp(x / scale, -max, max))        x = stored * scale

with one K scale and one V scale per layer (KVScales). The scales are 1.0 unless the checkpoint
carries them (`self_attn.k_scale` / `v_scale`, or the older `k_proj.output_scale`), or
calculate_kv_scales=True, which sets them from the first batch that reaches the layer:
scale = max|x| / KV_SCALE_TARGET, so that batch's largest value lands well inside fp8's range.
e4m3 keeps 3 mantissa bits over +-448 (what most checkpoints use); e5m2 keeps 2 over +-57344.

Every attention path reads the pools in place and dequantizes as it loads a row: the C++
kernels (csrc/vec.h turns a byte into a float via fp16's bit layout), the Triton kernels and
the PyTorch path below. The pools live as float8 tensors; the few PyTorch ops that have no
float8 kernel on the CPU (index_copy_) run on their uint8 view, which moves the same bytes.
"""

from __future__ import annotations

import torch

FP8_DTYPES = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
# calculate_kv_scales maps the first batch's largest |K| (|V|) to this value: vLLM's default,
# leaving headroom below e4m3's 448 for later, larger activations
KV_SCALE_TARGET = 200.0


def cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pools' element type for kv_cache_dtype ("auto": the model's)."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype not in FP8_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of auto, {', '.join(FP8_DTYPES)}, "
                         f"got {kv_cache_dtype!r}")
    return FP8_DTYPES[kv_cache_dtype]


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def as_bytes(pool: torch.Tensor) -> torch.Tensor:
    """A float8 pool as uint8 (the same memory), for ops without float8 kernels."""
    return pool.view(torch.uint8) if is_fp8(pool.dtype) else pool


class KVScales:
    """One attention layer's K and V scales.

    Held twice: as Python floats, which the CPU kernels take as arguments, and as float32
    tensors on the model's device, which the Triton kernels load (so captured CUDA graphs see
    a scale that changes after capture). `set` keeps both in step.
    """

    def __init__(self) -> None:
        self.k_scale = 1.0
        self.v_scale = 1.0
        # explicit device: layers are built under torch.device("meta")
        self.tensors = torch.ones(2, dtype=torch.float32, device="cpu")  # [k_scale, v_scale]
        self.calculate = False  # set from the next batch this layer sees (calculate_kv_scales)

    def to(self, device: torch.device | str) -> None:
        self.tensors = self.tensors.to(device)

    def set(self, k_scale: float, v_scale: float) -> None:
        for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
            if not value > 0 or value == float("inf"):
                raise ValueError(f"a KV cache {name} must be a positive finite number, got "
                                 f"{value}")
        self.k_scale, self.v_scale = float(k_scale), float(v_scale)
        self.tensors.copy_(torch.tensor([self.k_scale, self.v_scale]))

    def observe(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """With `calculate` set: scales from this batch's K and V, once."""
        if not self.calculate or key.numel() == 0:
            return
        self.calculate = False
        tiny = torch.finfo(torch.float32).tiny  # an all-zero batch still gets a usable scale
        self.set(max(key.abs().max().item() / KV_SCALE_TARGET, tiny),
                 max(value.abs().max().item() / KV_SCALE_TARGET, tiny))


def quantize(x: torch.Tensor, scale: float | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x / scale as `dtype`, saturating (a cast past fp8's range would give NaN). A tensor
    scale keeps it on the device without a host sync (the Triton path)."""
    limit = torch.finfo(dtype).max
    return (x.float() / scale).clamp_(-limit, limit).to(dtype)


def dequantize(stored: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    return (stored.float() * scale).to(dtype)


def round_trip(x: torch.Tensor, scale: float, cache: torch.dtype) -> torch.Tensor:
    """x as attention sees it after a trip through the cache (x itself for a float cache)."""
    if not is_fp8(cache):
        return x
    return dequantize(quantize(x, scale, cache), scale, x.dtype)

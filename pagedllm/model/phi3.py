"""Phi-3 (and Phi-4-mini, which shares model_type "phi3"): the Llama decoder, fused checkpoint.

The checkpoint already stores q|k|v as one `qkv_proj` tensor and gate|up as one `gate_up_proj`
tensor, named like our MergedLinear modules and in the same row order, so the generic loader
copies each in whole (the q_proj/gate_proj shard rules match only ".q_proj." etc., never the
fused names). Rope variants (longrope, and the older "su"/"yarn" names that transformers maps
to it) and partial_rotary_factor (Phi-4-mini rotates 3/4 of each head) are handled by the
shared RotaryEmbedding. config.sliding_window, when set, applies to every layer (as in
transformers; see llama.sliding_windows).
"""

from __future__ import annotations

from pagedllm.model.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    """Llama with whole-tensor fused weights; kept as its own class so the registry names it."""

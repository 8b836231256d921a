// The Python module of one kernel build. pagedllm/ops/cpu.py compiles every .cpp here once per
// ISA level, each build under its own module name; `level` says which build this is.
#include <torch/extension.h>
#include <pybind11/stl.h>

#include "int_kernels.h"
#include "kernels.h"
#include "quant_kernels.h"
#include "vec.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace pagedllm;
  m.attr("level") = vec::kLevel;
  m.attr("lanes") = vec::kLanes;
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention over a paged KV cache, in place (CPU)", py::arg("out"),
        py::arg("query"), py::arg("key_cache"), py::arg("value_cache"), py::arg("block_tables"),
        py::arg("seq_lens"), py::arg("scale"), py::arg("window"), py::arg("soft_cap"),
        py::arg("k_scale") = 1.0, py::arg("v_scale") = 1.0);
  m.def("paged_prefill_attention", &paged_prefill_attention,
        "every prefill chunk's attention over a paged KV cache, in place (CPU)", py::arg("out"),
        py::arg("query"), py::arg("key_cache"), py::arg("value_cache"), py::arg("chunks"),
        py::arg("block_tables"), py::arg("scale"), py::arg("window"), py::arg("soft_cap"),
        py::arg("k_scale") = 1.0, py::arg("v_scale") = 1.0);
  m.def("argmax", &argmax, "torch.argmax(logits, dim=-1) of contiguous float32/bfloat16 rows");
  m.def("rms_norm", &rms_norm, "out = RMSNorm(x) * weight");
  m.def("fused_add_rms_norm", &fused_add_rms_norm, "residual += x; x = RMSNorm(residual) * weight");
  m.def("silu_and_mul", &silu_and_mul, "out = silu(gate) * up");
  m.def("rotary_embedding", &rotary_embedding, "neox rotary on query and key, in place");
  m.def("write_kv", &write_kv,
        "copy new key/value rows into their cache slots (an fp8 cache: divided by its scales)",
        py::arg("key"), py::arg("value"), py::arg("key_cache"), py::arg("value_cache"),
        py::arg("slot_mapping"), py::arg("k_scale") = 1.0, py::arg("v_scale") = 1.0);
  m.def("bf16_linear", &bf16_linear, "out = x @ weight.T + bias, bf16 stored, float32 computed",
        py::arg("out"), py::arg("x"), py::arg("weight"), py::arg("bias") = py::none());
  m.def("lora_delta", &lora_delta,
        "out += each row's LoRA delta, rows under different adapter slots in one call (CPU)",
        py::arg("out"), py::arg("x"), py::arg("lora_a"), py::arg("lora_b"), py::arg("row_slots"),
        py::arg("slot_rows"));
  m.def("int_linear", &int_linear,
        "out = x @ W.T, W 4/8-bit packed with per-group scales and zero points (CPU)",
        py::arg("out"), py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"),
        py::arg("bits"), py::arg("group_size"), py::arg("bf16_gemm") = false);
  m.def("int_dequantize", &int_dequantize, "the float32 weight int_linear multiplies by",
        py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("bits"),
        py::arg("group_size"));
  m.def("gguf_linear", &gguf_linear,
        "out = x @ W.T from llama.cpp's quantized blocks (out may be a column slice)",
        py::arg("out"), py::arg("x"), py::arg("weight"), py::arg("ggml_type"),
        py::arg("int8_activations"), py::arg("interleaved") = false);
  m.def("gguf_dequantize", &gguf_dequantize, "out = the values of llama.cpp's quantized blocks",
        py::arg("out"), py::arg("weight"), py::arg("ggml_type"), py::arg("interleaved") = false,
        py::arg("rows") = py::none());
  m.def("gguf_interleave", &gguf_interleave,
        "the weight's bytes regrouped 16 rows at a time (Q4_0, Q4_1, Q8_0) for gguf_linear",
        py::arg("weight"), py::arg("ggml_type"));
}

"""GGUF weights kept quantized: the packed-block matmuls against the dequantized float32 ones,
the layers built from them, and whole models served quantized against the same file
dequantized (quantization="none").

Blocks come from gguf-py's own quantizer where it has one (Q4_0, Q4_1, Q8_0); the K-quants,
which it can only read, are built by their format's definition: random integers and 6-bit
scales, fp16 scales of a realistic size (gguf_blocks.py and csrc/gguf_linear.cpp draw them).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPTS, make_llm, worker_of
from tiny_models import save_tiny_model, write_metadata
from transformers import LlamaConfig

from pagedllm import SamplingParams, TokensPrompt
from pagedllm.attention import get_attention_backend
from pagedllm.model.layers.quantization.gguf import (
    GEMM_ROWS,
    GGUFEmbedding,
    GGUFLinear,
    is_interleaved,
)
from pagedllm.model.layers.quantization.gguf_blocks import BLOCK_FORMATS, dequantize
from pagedllm.model.loader import load_model, load_model_config
from pagedllm.model.source import default_model_path
from pagedllm.platform.cpu import cpu_info

Q = gguf.GGMLQuantizationType
TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
INT8_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0]  # the types with llama.cpp's int8-activation path
QUANTIZABLE = set(INT8_TYPES)  # gguf.quants.quantize raises NotImplementedError for the rest


def fp16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape[:-1], -1)


def random_k_blocks(ggml_type: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Valid K-quant rows [rows, bytes]: random integers, scales and mins, sized so that the
    values spread around zero with a standard deviation near 0.1."""
    fmt = BLOCK_FORMATS[int(ggml_type)]
    blocks = rng.integers(0, 256, size=(rows, cols // fmt.values, fmt.bytes), dtype=np.uint8)
    d = rng.uniform(0.5e-3, 1.5e-3, size=(*blocks.shape[:2], 1))
    if ggml_type == Q.Q6_K:  # bytes 208-209: d; the int8 scales (192-207) stay random
        blocks[..., 208:210] = fp16_bytes(d * 0.1)
    else:  # bytes 0-3: d, dmin; a mean min near the mean of d * scale * q centers the values
        top = 7.5 if ggml_type == Q.Q4_K else 15.5
        blocks[..., 0:4] = fp16_bytes(np.concatenate([d, d * top], axis=-1))
    return blocks.reshape(rows, -1)


def packed(ggml_type: Q, weight: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[rows, cols] float32 as rows of ggml_type blocks (the K-quants: random blocks)."""
    if ggml_type in QUANTIZABLE:
        return gguf.quants.quantize(weight, ggml_type)
    return random_k_blocks(ggml_type, *weight.shape, rng)


def blocks_of(ggml_type: Q, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((rows, cols)).astype(np.float32) * 0.1
    return torch.from_numpy(np.ascontiguousarray(packed(ggml_type, weight, rng)))


def reference(blocks: torch.Tensor, ggml_type: Q) -> torch.Tensor:
    """gguf-py's dequantization: the independent reading of the format."""
    return torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), ggml_type).astype(np.float32))


# ---- the format, read by PyTorch and by the C++ kernels ----------------------------------------
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_torch_dequantize_equals_gguf_py(ggml_type):
    blocks = blocks_of(ggml_type, 6, 512)
    assert torch.equal(dequantize(blocks, int(ggml_type)), reference(blocks, ggml_type))


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_kernel_dequantize_equals_gguf_py(ops, ggml_type):
    blocks = blocks_of(ggml_type, 40, 512)
    out = torch.empty(40, 512)
    ops.gguf_dequantize(out, blocks, int(ggml_type))
    assert torch.equal(out, reference(blocks, ggml_type))


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 5, 40])  # decode, a few rows (one pass), prefill (GEMM tiles)
def test_packed_matmul_equals_dequantized(ops, ggml_type, m):
    blocks = blocks_of(ggml_type, 72, 768)
    x = torch.randn(m, 768, generator=torch.Generator().manual_seed(m))
    out = torch.empty(m, 72)
    ops.gguf_linear(out, x, blocks, int(ggml_type), False)
    torch.testing.assert_close(out, x @ reference(blocks, ggml_type).T, rtol=1e-4, atol=1e-4)


def q8_activations(x: torch.Tensor) -> torch.Tensor:
    """x as llama.cpp quantizes activation rows: blocks of 32, scale max|x| / 127, int8."""
    blocks = x.unflatten(-1, (-1, 32))
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks / scale) * scale).flatten(-2)


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_packed_matmul_in_bfloat16(ops, ggml_type):
    """bf16 in and out: float32 arithmetic rounded once; the int8 path, where the type has
    one, on the 8-bit-quantized activations (what the engine runs for bf16)."""
    blocks = blocks_of(ggml_type, 40, 512)
    x = torch.randn(3, 512).bfloat16()
    out = torch.empty(3, 40, dtype=torch.bfloat16)
    int8 = ggml_type in INT8_TYPES
    ops.gguf_linear(out, x, blocks, int(ggml_type), int8)
    activations = q8_activations(x.float()) if int8 else x.float()
    expected = activations @ reference(blocks, ggml_type).T
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("ggml_type", INT8_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 6])
def test_int8_activation_path_is_the_q8_activation_product(ops, ggml_type, m):
    """The integer path computes exactly (x quantized to 8-bit blocks) @ W.T: compared with
    that product in float32, it agrees to float rounding; the activation quantization itself
    moves the result by far more (checked, so the comparison can tell the two apart)."""
    blocks = blocks_of(ggml_type, 64, 1024)
    x = torch.randn(m, 1024, generator=torch.Generator().manual_seed(7))
    out = torch.empty(m, 64)
    ops.gguf_linear(out, x, blocks, int(ggml_type), True)
    weight = reference(blocks, ggml_type)
    expected = q8_activations(x) @ weight.T
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=2e-4)
    assert (out - x @ weight.T).abs().max() > 1e-3


def test_output_may_be_a_column_slice(ops):
    blocks = blocks_of(Q.Q4_1, 32, 256)
    x = torch.randn(2, 256)
    out = torch.full((2, 48), 7.0)
    ops.gguf_linear(out[:, 8:40], x, blocks, int(Q.Q4_1), False)
    torch.testing.assert_close(out[:, 8:40], x @ reference(blocks, Q.Q4_1).T, rtol=1e-4, atol=1e-4)
    assert (out[:, :8] == 7).all() and (out[:, 40:] == 7).all()


def test_wrong_row_bytes_is_an_error(ops):
    with pytest.raises(RuntimeError, match="bytes per weight row"):
        ops.gguf_linear(torch.empty(1, 4), torch.randn(1, 256), torch.zeros(4, 100, dtype=torch.uint8),
                        int(Q.Q4_0), False)


# ---- rows regrouped 16 at a time (csrc/gguf_interleaved.cpp) -------------------------------
@pytest.mark.parametrize("ggml_type", INT8_TYPES, ids=lambda t: t.name)
def test_regrouped_weight_has_the_same_values(ops, ggml_type):
    """Regrouping moves bytes, never changes a value: the whole weight and any gathered rows
    dequantize to exactly the file layout's values, from a weight of the same size."""
    blocks = blocks_of(ggml_type, 48, 512)
    regrouped = ops.gguf_interleave(blocks, int(ggml_type))
    assert regrouped.shape == blocks.shape and not torch.equal(regrouped, blocks)
    out = torch.empty(48, 512)
    ops.gguf_dequantize(out, regrouped, int(ggml_type), True)
    assert torch.equal(out, reference(blocks, ggml_type))
    ids = torch.tensor([47, 0, 17, 17, 31])
    rows = torch.empty(5, 512, dtype=torch.bfloat16)
    ops.gguf_dequantize(rows, regrouped, int(ggml_type), True, ids)
    assert torch.equal(rows, reference(blocks, ggml_type)[ids].bfloat16())


@pytest.mark.parametrize("ggml_type", INT8_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 6, 40])  # decode, a few rows, prefill (GEMM tiles)
def test_regrouped_matmul_equals_the_file_layout(ops, ggml_type, m):
    """The regrouped kernel takes the same integer dot products as the file-layout kernel (and
    prefill the same dequantized GEMM): equal to float rounding, in float32 and bfloat16."""
    blocks = blocks_of(ggml_type, 64, 1024)
    regrouped = ops.gguf_interleave(blocks, int(ggml_type))
    x = torch.randn(m, 1024, generator=torch.Generator().manual_seed(3))
    for dtype in (torch.float32, torch.bfloat16):
        expected, out = torch.empty(m, 64, dtype=dtype), torch.empty(m, 64, dtype=dtype)
        ops.gguf_linear(expected, x.to(dtype), blocks, int(ggml_type), True)
        ops.gguf_linear(out, x.to(dtype), regrouped, int(ggml_type), True, True)
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    if m < GEMM_ROWS:  # the decode kernel against the Q8 activation product (not the GEMM's)
        expected32 = q8_activations(x) @ reference(blocks, ggml_type).T
        ops.gguf_linear(out32 := torch.empty(m, 64), x, regrouped, int(ggml_type), True, True)
        torch.testing.assert_close(out32, expected32, rtol=1e-4, atol=2e-4)


def test_regrouped_weight_misuse_is_an_error(ops):
    blocks = blocks_of(Q.Q4_1, 40, 256)  # 40 rows: not whole groups of 16
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ops.gguf_interleave(blocks, int(Q.Q4_1))
    with pytest.raises(RuntimeError, match="Q4_0, Q4_1 or Q8_0"):
        ops.gguf_interleave(blocks_of(Q.Q4_K, 32, 256), int(Q.Q4_K))
    regrouped = ops.gguf_interleave(blocks_of(Q.Q4_1, 32, 256), int(Q.Q4_1))
    with pytest.raises(RuntimeError, match="int8 activations only"):
        ops.gguf_linear(torch.empty(1, 32), torch.randn(1, 256), regrouped, int(Q.Q4_1), False,
                        True)
    with pytest.raises(RuntimeError, match="row id out of range"):
        ops.gguf_dequantize(torch.empty(1, 256), regrouped, int(Q.Q4_1), True, torch.tensor([32]))


# ---- layers --------------------------------------------------------------------------------
def mixed_qkv_layer() -> tuple[GGUFLinear, torch.Tensor]:
    """A q|k|v layer stored Q4_K | Q4_K | Q6_K (as Q4_K_M files do), and its float weight."""
    sizes, types = [64, 32, 32], [Q.Q4_K, Q.Q4_K, Q.Q6_K]
    layer = GGUFLinear(256, sizes, [int(t) for t in types], bias=True, dtype=torch.float32)
    float_parts = []
    for shard, (size, ggml_type) in enumerate(zip(sizes, types)):
        blocks = blocks_of(ggml_type, size, 256, seed=shard)
        layer.load_shard("weight", shard, blocks)
        float_parts.append(reference(blocks, ggml_type))
    for shard, size in enumerate(sizes):
        layer.load_shard("bias", shard, torch.randn(size))
    return layer, torch.cat(float_parts)


@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("rows", [3, 40])  # decode-sized, prefill-sized
def test_mixed_type_fused_layer(use_kernels, rows):
    layer, weight = mixed_qkv_layer()
    assert len(layer.runs) == 2 and layer.weight.dim() == 1  # Q4_K rows, then Q6_K rows
    layer.use_kernels = use_kernels
    x = torch.randn(rows, 256)
    torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [3, 40])
def test_bfloat16_layer(rows):
    """bf16 activations: the kernel (or, for prefill where oneDNN runs bf16, a bf16 GEMM on the
    dequantized weight) agrees with the float32 product to bf16 precision."""
    layer, weight = mixed_qkv_layer()
    layer.bias = None
    x = torch.randn(rows, 256).bfloat16()
    out = layer(x)
    assert out.dtype == torch.bfloat16
    if rows >= GEMM_ROWS and cpu_info().onednn_bf16:  # the GEMM multiplies bf16 weights
        weight = weight.bfloat16().float()
    torch.testing.assert_close(out.float(), x.float() @ weight.T, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_layer_regroups_for_the_integer_path_and_a_tied_embedding_follows(dtype):
    """bf16 layers (the integer path) regroup their weight once at prepare_for_inference; the
    embedding tied to it reads the regrouped bytes right. float32 layers keep the file layout
    (their float path reads it)."""
    blocks = blocks_of(Q.Q8_0, 64, 256)
    layer = GGUFLinear(256, [64], [int(Q.Q8_0)], bias=False, dtype=dtype)
    layer.weight.data.copy_(blocks)
    embedding = GGUFEmbedding(64, 256, int(Q.Q8_0), dtype)
    embedding.weight = layer.weight  # tied, as the loader ties lm_head and embed_tokens
    x = torch.randn(3, 256).to(dtype)
    before = layer(x)
    for _ in range(2):  # a second call must not regroup the regrouped bytes again
        layer.prepare_for_inference()
        embedding.prepare_for_inference()
    regrouped = dtype == torch.bfloat16
    assert is_interleaved(layer.weight) == regrouped
    assert torch.equal(layer.weight, blocks) != regrouped
    torch.testing.assert_close(layer(x), before, rtol=1e-2, atol=1e-2)
    ids = torch.tensor([63, 0, 5, 16])
    assert torch.equal(embedding(ids), reference(blocks, Q.Q8_0)[ids].to(dtype))


def test_fused_shard_of_the_wrong_type_is_refused():
    layer, _ = mixed_qkv_layer()
    with pytest.raises(ValueError, match="shard 2 of weight"):
        layer.load_shard("weight", 2, blocks_of(Q.Q4_K, 32, 256))


@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_dequantizes_the_looked_up_rows(use_kernels, dtype):
    blocks = blocks_of(Q.Q8_0, 100, 64)
    embedding = GGUFEmbedding(100, 64, int(Q.Q8_0), dtype)
    embedding.weight.data.copy_(blocks)
    embedding.use_kernels = use_kernels
    ids = torch.tensor([[3, 99], [0, 3]])
    expected = reference(blocks, Q.Q8_0)[ids].to(dtype)
    assert torch.equal(embedding(ids), expected)


# ---- whole models --------------------------------------------------------------------------
# Per tensor: gguf-py's quantizer on the model's own weights, or (K-quants) valid random blocks
TINY_TYPES = {"attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q6_K, "attn_output": Q.Q5_K,
              "ffn_gate": Q.Q4_0, "ffn_up": Q.Q4_1, "ffn_down": Q.Q8_0, "token_embd": Q.Q8_0}


def write_quantized_llama(model, path) -> None:
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    write_metadata(writer, config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    rng = np.random.default_rng(0)
    for hf_name, tensor in model.state_dict().items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        ggml_type = TINY_TYPES.get(name.split(".")[-2] if name.startswith("blk") else
                                   name.split(".")[0])
        array = tensor.float().numpy()
        if ggml_type is None:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, packed(ggml_type, array, rng), raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_quantized_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf-quantized")
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=2, vocab_size=512,
                         max_position_embeddings=256, tie_word_embeddings=True)
    path = folder / "tiny.gguf"
    write_quantized_llama(save_tiny_model(config, folder), path)
    return path


def greedy_tokens(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                           use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def test_tiny_model_quantized_equals_dequantized(tiny_quantized_gguf):
    settings = dict(model=str(tiny_quantized_gguf), skip_tokenizer_init=True,
                    kv_cache_memory_bytes=4 << 20, max_num_batched_tokens=16)
    quantized, dequantized = make_llm(**settings), make_llm(**settings, quantization="none")
    layer = worker_of(quantized).runner.model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, GGUFLinear)
    assert len(layer.self_attn.qkv_proj.runs) == 2  # q|k Q4_K, v Q6_K
    prompts = [[5, 17, 99, 3], list(range(40, 70))]  # the second prompt is prefilled in chunks
    assert greedy_tokens(quantized, prompts, 12) == greedy_tokens(dequantized, prompts, 12)


def test_bundled_model_resident_bytes_near_the_file_size():
    config = load_model_config(None, "float32")
    assert config.quantization is not None and config.quantization.name == "gguf"
    model = load_model(config, get_attention_backend("cpu"), "cpu")
    assert isinstance(model.model.embed_tokens, GGUFEmbedding)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, one copy
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    resident = sum(t.numel() * t.element_size() for t in tensors.values())
    file_size = default_model_path().stat().st_size
    assert abs(resident - file_size) <= 0.1 * file_size, (resident, file_size)


@pytest.mark.slow
def test_bundled_model_quantized_equals_dequantized():
    """The 8 correctness prompts, greedy in float32 (bf16 near-ties could flip a token)."""
    params = SamplingParams(temperature=0, max_tokens=64)
    quantized = make_llm().generate(PROMPTS, params, use_tqdm=False)
    dequantized = make_llm(quantization="none").generate(PROMPTS, params, use_tqdm=False)
    assert ([o.outputs[0].token_ids for o in quantized]
            == [o.outputs[0].token_ids for o in dequantized])

"""A tiny random Llama with a word-level tokenizer (loads in a second, so the benchmarks run end
to end, offline and behind a real server, in the fast suite), and dataset files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from pagedllm.bench.dataset import WORDS

VOCAB_SIZE = 256
MAX_POSITIONS = 128
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """One token per word of bench.dataset.WORDS, so a synthetic prompt of N words is exactly N
    prompt tokens; every other id decodes to a word of its own (w0, w1, ...)."""
    vocab = ["<unk>", "<s>", "</s>", "user", "assistant", *WORDS]
    vocab += [f"w{i}" for i in range(VOCAB_SIZE - len(vocab))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins the words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_model(folder: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB_SIZE,
                         max_position_embeddings=MAX_POSITIONS)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def write_jsonl(path: Path, entries: list) -> Path:
    path.write_text("".join((e if isinstance(e, str) else json.dumps(e)) + "\n"
                            for e in entries))
    return path

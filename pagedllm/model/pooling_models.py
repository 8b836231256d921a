"""Which checkpoints run as pooling models, with what pooling, and the classes they load as.

    runner "auto"      pooling for a BERT checkpoint, a *ForSequenceClassification, or a
                       sentence-transformers folder (modules.json); else generate
    runner "pooling"   any decoder of the registry too, as an embedder (last-token pooling
                       unless the checkpoint or --pooler-config says otherwise)

The pooling configuration comes, later overriding earlier, from the architecture's default,
sentence-transformers' modules.json + 1_Pooling/config.json (and a Normalize module), config.json
(matryoshka_dimensions), and the user's --pooler-config.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedllm.model.bert import BertForSequenceClassification, BertModel
from pagedllm.model.layers.linear import Linear
from pagedllm.model.pipeline import MissingModule
from pagedllm.pooling_params import PoolerConfig

ENCODER_TYPES = {"bert"}  # model types that only pool
ENCODER_CLASSES = {"BertModel": BertModel,
                   "BertForSequenceClassification": BertForSequenceClassification}
# sentence-transformers Pooling config key -> our pooling type
ST_POOLING_MODES = {"pooling_mode_cls_token": "CLS", "pooling_mode_mean_tokens": "MEAN",
                    "pooling_mode_lasttoken": "LAST"}
ST_SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")


def is_classifier(hf_config: PretrainedConfig) -> bool:
    return any(a.endswith("ForSequenceClassification")
               for a in getattr(hf_config, "architectures", None) or [])


def resolve_runner(requested: str, hf_config: PretrainedConfig, folder: Path | None) -> str:
    """"generate" or "pooling"; ValueError for a generation runner on an encoder."""
    encoder = hf_config.model_type in ENCODER_TYPES
    if requested == "generate" and encoder:
        raise ValueError(f"{hf_config.model_type} is an encoder: it cannot generate text; "
                         "serve it with runner='pooling' (--runner pooling)")
    if requested != "auto":
        return requested
    sentence_transformers = folder is not None and (folder / "modules.json").is_file()
    return "pooling" if encoder or is_classifier(hf_config) or sentence_transformers \
        else "generate"


def pooling_tasks(hf_config: PretrainedConfig) -> tuple[str, ...]:
    """What a pooling model can do: embed (and score by cosine similarity), or classify (and
    score as a cross-encoder, with a single label)."""
    if not is_classifier(hf_config):
        return ("embed", "encode", "score")
    return ("classify", "encode", "score") if hf_config.num_labels == 1 else \
        ("classify", "encode")


def resolve_pooler_config(hf_config: PretrainedConfig, folder: Path | None,
                          overrides: dict) -> PoolerConfig:
    default = "CLS" if hf_config.model_type in ENCODER_TYPES else "LAST"
    config = PoolerConfig(pooling_type=default)
    settings = sentence_transformers_settings(folder) if folder is not None else {}
    declared = getattr(hf_config, "matryoshka_dimensions", None)
    if declared:
        settings["matryoshka_dimensions"] = list(declared)
    return config.merged(settings).merged(overrides)


def sentence_transformers_settings(folder: Path) -> dict:
    """The pooling a sentence-transformers folder declares (empty: not one)."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return {}
    modules = json.loads(modules_file.read_text())
    kinds = [m["type"].rpartition(".")[2] for m in modules]
    unsupported = [k for k in kinds if k not in ST_SUPPORTED_MODULES]
    if unsupported:
        raise ValueError(f"sentence-transformers modules {unsupported} are not supported "
                         f"(supported: {', '.join(ST_SUPPORTED_MODULES)})")
    settings: dict = {"normalize": "Normalize" in kinds}
    for module in modules:
        if module["type"].endswith(".Pooling"):
            settings["pooling_type"] = _st_pooling_type(folder / module["path"] / "config.json")
    return settings


def _st_pooling_type(path: Path) -> str:
    config = json.loads(path.read_text())
    chosen = [kind for key, kind in ST_POOLING_MODES.items() if config.get(key)]
    others = [k for k, v in config.items() if k.startswith("pooling_mode") and v
              and k not in ST_POOLING_MODES]
    if others or len(chosen) != 1:
        raise ValueError(f"{path}: pooling modes {others or chosen} are not supported (one of "
                         f"{', '.join(ST_POOLING_MODES)})")
    return chosen[0]


def sentence_transformers_max_len(folder: Path | None) -> int | None:
    """sentence_bert_config.json's max_seq_length: the length the model was trained to embed."""
    path = folder / "sentence_bert_config.json" if folder is not None else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text()).get("max_seq_length")


def pooling_model_class(hf_config: PretrainedConfig, decoder_class: type[nn.Module] | None
                        ) -> type[nn.Module]:
    """The class a pooling checkpoint loads as: an encoder's own, or a registry decoder
    turned into an embedder or a classifier."""
    architectures = getattr(hf_config, "architectures", None) or []
    if hf_config.model_type in ENCODER_TYPES:
        for name in architectures:
            if name in ENCODER_CLASSES:
                return ENCODER_CLASSES[name]
        if is_classifier(hf_config):
            raise ValueError(f"architecture {architectures} is not supported as a pooling model")
        return BertModel
    base = decoder_class
    return type(f"{base.__name__}ForPooling",
                (DecoderClassifier if is_classifier(hf_config) else DecoderEmbedder, base), {})


class DecoderEmbedder(nn.Module):
    """Mixed in before a registry decoder: its final hidden states, no LM head. Checkpoints
    saved from the bare decoder (Qwen3-Embedding, e5-mistral) name their tensors without the
    "model." prefix; those are read as the decoder's own."""

    def __init__(self, config: PretrainedConfig, max_model_len: int, backend) -> None:
        super().__init__(config, max_model_len, backend)
        self.tie_word_embeddings = False
        self.lm_head = MissingModule()

    def compute_logits(self, hidden: torch.Tensor) -> None:
        return None  # no language-model head (the GPU memory plan asks)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._own_names(weights))

    head_prefixes: tuple[str, ...] = ()  # checkpoint names of a head of our own

    def _own_names(self, weights):
        for name, tensor in weights:
            if name.startswith("lm_head."):
                continue
            if not name.startswith(("model.", *self.head_prefixes)):
                name = "model." + name
            yield name, tensor


class DecoderClassifier(DecoderEmbedder):
    """*ForSequenceClassification on a registry decoder: the last token's hidden state through
    a linear `score` head (transformers' layout)."""

    def __init__(self, config: PretrainedConfig, max_model_len: int, backend) -> None:
        super().__init__(config, max_model_len, backend)
        self.num_labels = config.num_labels
        self.score = Linear(config.hidden_size, config.num_labels, bias=False)

    head_prefixes = ("score.",)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.score(pooled)

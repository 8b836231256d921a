"""How a pooling model's pooling is configured (no model runs here): sentence-transformers'
files, --pooler-config over them, and what is refused by name."""

from __future__ import annotations

import json

import pytest
from pooling_helpers import minilm_path
from transformers import BertConfig, LlamaConfig

from pagedllm.config import EngineArgs
from pagedllm.model.pooling_models import (
    resolve_pooler_config,
    resolve_runner,
    sentence_transformers_settings,
)
from pagedllm.pooling_params import PoolerConfig, PoolingParams


def test_sentence_transformers_files_say_mean_and_normalize():
    assert sentence_transformers_settings(minilm_path()) == {"normalize": True,
                                                             "pooling_type": "MEAN"}


def test_pooler_config_overrides_the_checkpoint(tmp_path):
    config = resolve_pooler_config(BertConfig(), minilm_path(),
                                   {"pooling_type": "cls", "matryoshka_dimensions": [64]})
    assert (config.pooling_type, config.normalize, config.matryoshka) == ("CLS", True, True)
    assert resolve_pooler_config(LlamaConfig(), None, {}).pooling_type == "LAST"


@pytest.mark.parametrize(("modules", "pooling", "message"), [
    ([{"type": "sentence_transformers.models.Dense", "path": "2_Dense"}], None,
     r"modules \['Dense'\] are not supported"),
    ([{"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}],
     {"pooling_mode_max_tokens": True}, "pooling modes"),
])
def test_unsupported_sentence_transformers_modules_are_refused(tmp_path, modules, pooling,
                                                                message):
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    if pooling is not None:
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    with pytest.raises(ValueError, match=message):
        sentence_transformers_settings(tmp_path)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: EngineArgs(pooler_config="{not json"), "must be a JSON object"),
    (lambda: EngineArgs(pooler_config="[1]"), "must be a JSON object"),
    (lambda: EngineArgs(runner="embed"), "runner must be one of"),
    (lambda: PoolerConfig().merged({"pooling": "CLS"}), "unknown keys"),
    (lambda: PoolerConfig(pooling_type="MAX"), "pooling_type must be one of"),
    (lambda: PoolingParams(task="rank"), "pooling task must be one of"),
    (lambda: PoolingParams(dimensions=0), "dimensions must be a positive integer"),
    (lambda: PoolerConfig(matryoshka_dimensions=[64]).check_dimensions(32, 384),
     r"dimensions must be one of \[64\]"),
    (lambda: PoolerConfig(matryoshka=True).check_dimensions(500, 384), "exceeds"),
    (lambda: resolve_runner("generate", BertConfig(), None), "cannot generate text"),
])
def test_bad_settings_are_value_errors_naming_them(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_runner_detection():
    llama = LlamaConfig()
    assert resolve_runner("auto", llama, None) == "generate"
    assert resolve_runner("pooling", llama, None) == "pooling"
    assert resolve_runner("auto", LlamaConfig(architectures=["LlamaForSequenceClassification"]),
                          None) == "pooling"
    assert resolve_runner("auto", BertConfig(), None) == "pooling"

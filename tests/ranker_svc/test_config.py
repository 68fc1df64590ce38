"""RankerConfig: sections, validation naming the setting, environment overrides, flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from exitrank.config_sources import ConfigError
from ranker_svc.config import BatchingConfig, ModelConfig, RankerConfig
from ranker_svc.server import parse_args


def test_environment_variables_override_single_typed_keys():
    env = {"EXITRANK_RANKER_BATCHING_MAX_WAIT_MS": "7.5", "EXITRANK_RANKER_BATCHING_SHARED_CONTEXT": "false",
           "EXITRANK_RANKER_MODEL_ENGINE": "onnx", "EXITRANK_RANKER_MODEL_ONNX_DIR": "/tmp/x",
           "EXITRANK_RANKER_EXITS_THRESHOLD": "0.2", "EXITRANK_RANKER_SERVER_PORT": "7000", "UNRELATED": "1"}
    config = RankerConfig().with_env(env)
    assert config.batching.max_wait_ms == 7.5 and config.batching.shared_context is False
    assert config.model.engine == "onnx" and config.model.onnx_dir == Path("/tmp/x")
    assert config.exits.overrides() == {"threshold": 0.2} and config.server.port == 7000
    assert RankerConfig().with_env({}) == RankerConfig()


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"EXITRANK_RANKER_BATCHING_MAX_WAIT_MSS": "1"}, "EXITRANK_RANKER_BATCHING_MAX_WAIT_MSS"),
        ({"EXITRANK_RANKER_BATCH_SIZE": "1"}, "EXITRANK_RANKER_BATCH_SIZE"),
        ({"EXITRANK_RANKER_SERVER_PORT": "many"}, "EXITRANK_RANKER_SERVER_PORT"),
        ({"EXITRANK_RANKER_BATCHING_SHARED_CONTEXT": "maybe"}, "EXITRANK_RANKER_BATCHING_SHARED_CONTEXT"),
        ({"EXITRANK_RANKER_MODEL_ENGINE": "tensorrt"}, "model.engine"),
        ({"EXITRANK_RANKER_BATCHING_MAX_WAIT_MS": "5000"}, "batching.max_wait_ms"),
    ],
)
def test_bad_environment_values_name_the_variable_or_setting(env, name):
    with pytest.raises(ConfigError, match=f"^{name}"):
        RankerConfig().with_env(env)


def test_sections_validate_new_settings():
    with pytest.raises(ConfigError, match="model.tensor_parallel"):
        ModelConfig(tensor_parallel=0)
    with pytest.raises(ConfigError, match="model.tensor_parallel"):
        ModelConfig(tensor_parallel=2, engine="torch")
    assert ModelConfig(tensor_parallel=2, engine="deepspeed").tensor_parallel == 2
    with pytest.raises(ConfigError, match="batching.max_batch_rows"):
        BatchingConfig(max_batch_rows=0)
    assert RankerConfig.from_dict({"model": {"onnx_dir": "o"}}).model.onnx_dir == Path("o")


def test_flags_win_over_environment_and_file(tmp_path, monkeypatch):
    path = tmp_path / "ranker.yaml"
    path.write_text("batching: {max_wait_ms: 1.0, max_batch_rows: 64}\nmodel: {engine: deepspeed}\n")
    monkeypatch.setenv("EXITRANK_RANKER_BATCHING_MAX_WAIT_MS", "3.0")
    config = parse_args(["serve", "--port", "0", "--retriever", "h:1", "--artifacts", "a", "--config", str(path)])
    assert config.batching.max_wait_ms == 3.0 and config.batching.max_batch_rows == 64  # env over file
    assert config.model.engine == "deepspeed"  # an unset flag keeps the file's value
    config = parse_args(["serve", "--port", "0", "--retriever", "h:1", "--artifacts", "a", "--config", str(path),
                         "--max-wait-ms", "9", "--engine", "onnx", "--num-threads", "2"])
    assert config.batching.max_wait_ms == 9.0 and config.model.engine == "onnx" and config.model.num_threads == 2

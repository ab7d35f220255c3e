"""SparsityConfig: exact JSON round trip, validation that names the field, registry behaviour."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_nlp import ConfigError, SparsityConfig, StructuredSparsity, WeightSparsity
from sparse_nlp.config import FORMAT_VERSION
from sparse_nlp.registry import Registry, RegistryError

rules = st.builds(
    WeightSparsity,
    method=st.just("magnitude"),
    sparsity=st.floats(min_value=0.0, max_value=0.999, allow_nan=False),
    pattern=st.sampled_from(["unstructured", "block:2x2", "block:1x4"]),
    scope=st.sampled_from(["per-layer", "per-row", "global"]),
    targets=st.lists(
        st.sampled_from(["attention", "ffn", "all-linear", r"re:\.query$"]), min_size=1, max_size=3
    ),
    exclude=st.lists(st.sampled_from([r"layer\.0\.", "pooler"]), max_size=2),
    options=st.just({}),
)


@settings(max_examples=60, deadline=None)
@given(weights=st.lists(rules, max_size=3), heads=st.floats(0, 0.9), ffn=st.floats(0, 0.9))
def test_json_round_trip_is_exact(weights, heads, ffn):
    config = SparsityConfig(weights=weights, structured=StructuredSparsity(heads=heads, ffn=ffn))
    text = config.to_json()
    again = SparsityConfig.from_json(text)
    assert again == config
    assert again.to_json() == text


def test_nm_pattern_round_trip_and_fixed_sparsity():
    config = SparsityConfig(weights=[WeightSparsity(sparsity=0.5, pattern="2:4")]).validate()
    assert SparsityConfig.from_dict(json.loads(config.to_json())) == config
    with pytest.raises(ConfigError, match=r"weights\[0\]\.sparsity is 0\.7 but pattern 2:4 fixes it at 0\.5"):
        SparsityConfig(weights=[WeightSparsity(sparsity=0.7, pattern="2:4")]).validate()


def test_file_round_trip(tmp_path):
    config = SparsityConfig.magnitude(0.3, targets=["ffn"], scope="global")
    config.save(tmp_path / "c.json")
    assert SparsityConfig.load(tmp_path / "c.json") == config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"weights": [{"sparsity": 1.0}]}, r"weights\[0\]\.sparsity must be in \[0, 1\).*1\.0"),
        ({"weights": [{"sparsity": -0.1}]}, r"weights\[0\]\.sparsity must be in \[0, 1\)"),
        ({"weights": [{"sparsity": "half"}]}, r"weights\[0\]\.sparsity must be a number, got 'half'"),
        (
            {"weights": [{"method": "magnitud"}]},
            r"weights\[0\]\.method: unknown pruning method 'magnitud'\. Did you mean 'magnitude'",
        ),
        (
            {"weights": [{"pattern": "3:2"}]},
            r"weights\[0\]\.pattern: invalid N:M pattern 3:2.*Accepted forms",
        ),
        (
            {"weights": [{"scope": "per-layr"}]},
            r"weights\[0\]\.scope must be one of.*Did you mean 'per-layer'",
        ),
        ({"weights": [{"targets": ["fnn"]}]}, r"weights\[0\]\.targets\[0\] is 'fnn'.*Did you mean 'ffn'"),
        ({"weights": [{"sparsty": 0.5}]}, r"unknown field 'weights\[0\]\.sparsty'\. Did you mean 'sparsity'"),
        ({"wieghts": []}, r"unknown field 'wieghts'\. Did you mean 'weights'"),
        ({"weights": [{"targets": []}]}, r"weights\[0\]\.targets is empty"),
        ({"format_version": FORMAT_VERSION + 1}, r"format_version 2 is newer.*upgrade sparse_nlp"),
        ({"structured": {"heads": 1.5}}, r"structured\.heads must be in \[0, 1\)"),
        ({"weights": {"sparsity": 0.5}}, r"weights must be a list"),
    ],
)
def test_validation_names_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        SparsityConfig.from_dict(data)


def test_invalid_json_text():
    with pytest.raises(ConfigError, match="not valid JSON"):
        SparsityConfig.from_json("{weights: ")


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        SparsityConfig.load(tmp_path / "nope.json")


def test_registry_rejects_duplicates_and_suggests_names():
    reg: Registry = Registry("widget")
    reg.register("alpha")(object)
    with pytest.raises(RegistryError, match="widget 'alpha' is already registered"):
        reg.register("alpha")(int)
    with pytest.raises(RegistryError, match="unknown widget 'alpah'. Did you mean 'alpha'"):
        reg.get("alpah")
    assert reg.names() == ["alpha"] and "alpha" in reg

"""LoRAConfig: target matching (exact, suffix, regex), errors; both packages agree."""

from __future__ import annotations

import pytest

import jaxlora
import torchlora

PATHS = [
    "tok_emb",
    "blocks_0",
    "blocks_0.attn",
    "blocks_0.attn.query",
    "blocks_0.attn.key",
    "blocks_0.attn.value",
    "blocks_0.mlp.fc",
    "blocks_1.attn.query",
    "head",
    "subquery",
]
CONFIGS = [jaxlora.LoRAConfig, torchlora.LoRAConfig]


@pytest.mark.parametrize("Config", CONFIGS, ids=["jaxlora", "torchlora"])
@pytest.mark.parametrize(
    "targets,expected",
    [
        (
            ["query"],
            ["blocks_0.attn.query", "blocks_1.attn.query"],
        ),  # suffix on '.', not "subquery"
        (
            ["attn.query", "value"],
            ["blocks_0.attn.query", "blocks_0.attn.value", "blocks_1.attn.query"],
        ),
        (["head"], ["head"]),  # exact
        (["blocks_0.attn.query"], ["blocks_0.attn.query"]),
        (r"blocks_0\.attn\.(query|key)", ["blocks_0.attn.query", "blocks_0.attn.key"]),
        (r"query", []),  # a regex must match the whole path
        (r".*query", ["blocks_0.attn.query", "blocks_1.attn.query", "subquery"]),
    ],
    ids=["suffix", "two-entries", "exact", "full-path", "regex", "regex-whole", "regex-prefix"],
)
def test_matching(Config, targets, expected):
    config = Config(r=4, targets=targets)
    assert [p for p in PATHS if config.matches(p)] == expected


@pytest.mark.parametrize("Config", CONFIGS, ids=["jaxlora", "torchlora"])
def test_no_match_lists_the_paths(Config):
    with pytest.raises(
        ValueError,
        match=r"match no layer; the layer paths are: tok_emb, "
        r"blocks_0, blocks_0\.attn, .*head, subquery",
    ):
        Config(r=4, targets=["qkv"]).select(PATHS)


@pytest.mark.parametrize("Config", CONFIGS, ids=["jaxlora", "torchlora"])
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(r=0, targets=["q"]), ValueError, "r must be >= 1, got 0"),
        (dict(r=1.5, targets=["q"]), TypeError, "r must be an int"),
        (dict(r=4, alpha=-2, targets=["q"]), ValueError, "alpha must be a finite number > 0"),
        (dict(r=4, dropout=1.2, targets=["q"]), ValueError, r"dropout must be in \[0, 1\)"),
        (dict(r=4, targets=[]), ValueError, "non-empty list"),
        (dict(r=4, targets=["q", ""]), ValueError, "non-empty list"),
        (dict(r=4, targets="(unclosed"), ValueError, "not a valid regular expression"),
    ],
    ids=["r0", "r-float", "alpha-neg", "dropout", "empty", "empty-entry", "bad-regex"],
)
def test_config_errors(Config, kwargs, error, match):
    with pytest.raises(error, match=match):
        Config(**kwargs)


def test_same_fields_in_both_packages():
    import dataclasses

    fields = [[(f.name, f.default) for f in dataclasses.fields(c)] for c in CONFIGS]
    assert fields[0] == fields[1]
    assert [f[0] for f in fields[0]] == ["r", "alpha", "targets", "dropout", "use_rslora"]

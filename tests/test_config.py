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


def test_one_config_class_for_both_packages():
    import dataclasses

    assert jaxlora.LoRAConfig is torchlora.LoRAConfig  # one object configures both sides
    assert [f.name for f in dataclasses.fields(jaxlora.LoRAConfig)] == [
        "r",
        "alpha",
        "targets",
        "dropout",
        "use_rslora",
        "rank_pattern",
        "alpha_pattern",
        "init",
        "use_dora",
        "target_parameters",
    ]
    with pytest.raises(
        ValueError, match=r"init must be one of \('kaiming', 'gaussian', 'pissa', 'olora'\)"
    ):
        jaxlora.LoRAConfig(r=2, targets=["q"], init="loftq")
    with pytest.raises(ValueError, match="init_lora_weights='loftq'"):
        jaxlora.LoRAConfig.from_peft(
            {**jaxlora.LoRAConfig(r=2, targets=["q"]).to_peft(), "init_lora_weights": "loftq"}
        )


@pytest.mark.parametrize("Config", CONFIGS, ids=["jaxlora", "torchlora"])
def test_rank_and_alpha_patterns_follow_peft(Config):
    config = Config(
        r=8,
        alpha=16,
        targets=["query", "value"],
        rank_pattern={"blocks_1.attn.value": 2, "value": 4},
        alpha_pattern={"query": 3},
    )
    assert config.rank_for("blocks_0.attn.query") == 8
    assert config.rank_for("blocks_0.attn.value") == 4  # first matching key wins, as in PEFT
    assert config.rank_for("blocks_1.attn.value") == 2
    assert config.rank_for("blocks_0.attn.subvalue") == 8  # a key matches whole '.' segments
    assert config.alpha_for("blocks_0.attn.query") == 3.0
    assert config.alpha_for("blocks_0.attn.value") == 16.0
    default = Config(r=8, targets=["q"], rank_pattern={"q": 2})
    assert default.alpha_for("a.q") == 2.0 and default.alpha_for("a.k") == 8.0  # alpha = rank


@pytest.mark.parametrize("Config", CONFIGS, ids=["jaxlora", "torchlora"])
def test_peft_config_roundtrip(Config):
    config = Config(
        r=8, targets=["query", "value"], dropout=0.1, use_rslora=True, rank_pattern={"value": 4}
    )
    peft = config.to_peft()
    assert peft["peft_type"] == "LORA" and peft["lora_alpha"] == 8 and peft["r"] == 8
    assert peft["alpha_pattern"] == {"value": 4}  # alpha=None means alpha = each layer's rank
    back = Config.from_peft(peft)
    for path in ("a.query", "a.value", "b.value"):
        assert back.rank_for(path) == config.rank_for(path)
        assert back.alpha_for(path) == config.alpha_for(path)
    assert (back.dropout, back.use_rslora, back.targets) == (0.1, True, ("query", "value"))
    assert Config.from_peft({**peft, "target_modules": ".*q"}).targets == ".*q"


@pytest.mark.parametrize("Config", CONFIGS, ids=["jaxlora", "torchlora"])
@pytest.mark.parametrize(
    "change,match",
    [
        (dict(peft_type=None), "no 'peft_type'"),
        (dict(peft_type="IA3"), "peft_type 'IA3'; only 'LORA'"),
        (dict(lora_alpha=None), r"no 'lora_alpha' \(PEFT would silently use 8\)"),
        (dict(r=None), "no 'r'"),
        (
            dict(use_dora=True, init_lora_weights="pissa"),
            "use_dora=True with init='pissa' is not implemented",
        ),
        (dict(bias="all"), "bias='all'"),
    ],
    ids=["no-type", "ia3", "no-alpha", "no-r", "dora-pissa", "bias"],
)
def test_peft_config_errors(Config, change, match):
    peft = {**Config(r=4, targets=["q"]).to_peft(), **change}
    peft = {k: v for k, v in peft.items() if not (k == "peft_type" and v is None)}
    with pytest.raises(ValueError, match=match):
        Config.from_peft(peft)

"""MoEConfig validates at construction and names the field it rejects."""

import pytest

from expert_parallel import ExecutionConfig, MoEConfig

BASE = dict(d_model=8, d_hidden=16, num_experts=4)


def test_defaults_are_dropless_top2_softmax_and_d_out_follows_d_model():
    config = MoEConfig(**BASE)
    assert (config.top_k, config.score_func, config.capacity_factor, config.d_out) == (2, "softmax", None, 8)
    assert config.dropless and config.capacity(1000) is None
    assert MoEConfig(**BASE, d_out=5).d_out == 5


@pytest.mark.parametrize(
    "field,value",
    [
        ("d_model", 0),
        ("d_model", 8.0),
        ("d_hidden", -1),
        ("num_experts", 0),
        ("top_k", 0),
        ("top_k", 5),
        ("d_out", 0),
        ("score_func", "relu"),
        ("drop_policy", "random"),
        ("activation", "tanh"),
        ("capacity_factor", 0.0),
        ("capacity_factor", -1.0),
        ("capacity_factor", float("nan")),
        ("capacity_factor", "1.25"),
        ("min_capacity", -1),
        ("normalize_weights", 1),
        ("bias", "yes"),
        ("router_bias", None),
        ("aux_loss_coef", -0.1),
        ("z_loss_coef", float("inf")),
    ],
)
def test_invalid_field_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        MoEConfig(**{**BASE, field: value})


@pytest.mark.parametrize(
    "factor,tokens,top_k,min_capacity,want",
    [
        (1.0, 10, 2, 0, 5),  # ceil(1.0 * 10 * 2 / 4) = 5
        (1.25, 10, 2, 0, 7),  # ceil(6.25) = 7
        (0.1, 10, 1, 4, 4),  # ceil(0.25) = 1, raised to min_capacity 4
        (1.0, 0, 2, 0, 0),
    ],
)
def test_capacity_formula(factor, tokens, top_k, min_capacity, want):
    config = MoEConfig(**BASE, top_k=top_k, capacity_factor=factor, min_capacity=min_capacity)
    assert config.capacity(tokens) == want


def test_frozen_and_round_trips_through_a_dict():
    config = MoEConfig(**BASE, capacity_factor=1.5)
    with pytest.raises(AttributeError):
        config.top_k = 1
    assert MoEConfig(**config.to_dict()) == config


def test_how_a_layer_runs_is_not_part_of_what_it_computes():
    names = set(MoEConfig(**BASE).to_dict())
    assert not names & {"dispatch", "exchange_chunks", "max_tokens_per_expert", "gemm"}
    with pytest.raises(TypeError):
        MoEConfig(**BASE, dispatch="once_per_rank")
    assert ExecutionConfig().to_dict() == {
        "dispatch": "per_assignment",
        "exchange_chunks": 1,
        "max_tokens_per_expert": None,
        "gemm": "auto",
    }


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("dispatch", "per_token", ["ExecutionConfig.dispatch", "per_token"]),
        ("exchange_chunks", 0, ["ExecutionConfig.exchange_chunks"]),
        ("exchange_chunks", 2.0, ["ExecutionConfig.exchange_chunks"]),
        ("max_tokens_per_expert", 0, ["ExecutionConfig.max_tokens_per_expert"]),
        ("max_tokens_per_expert", True, ["ExecutionConfig.max_tokens_per_expert"]),
        ("gemm", "cublas", ["ExecutionConfig.gemm", "cublas"]),
    ],
)
def test_execution_config_names_the_field_it_rejects(field, value, words):
    with pytest.raises(ValueError) as err:
        ExecutionConfig(**{field: value})
    assert all(w in str(err.value) for w in words), str(err.value)


def test_chunks_need_per_assignment_dispatch():
    with pytest.raises(
        ValueError, match=r"ExecutionConfig\.exchange_chunks=2 needs dispatch='per_assignment'"
    ):
        ExecutionConfig(exchange_chunks=2, dispatch="once_per_rank")
    assert ExecutionConfig(exchange_chunks=2).exchange_chunks == 2


def test_the_fine_tuner_refuses_an_execution_field_in_its_moe_section():
    from expert_parallel.finetuning import FinetuneConfig

    train = {"steps": 1, "global_batch": 8, "micro_batch": 8, "out_dir": "unused"}
    moe = {"capacity_factor": 1.25, "dispatch": "fixed"}
    tree = {"model": {"path": "unused"}, "train": train, "moe": moe}
    with pytest.raises(ValueError, match=r"moe\.dispatch .* set it in \[execution\] \(execution\.dispatch\)"):
        FinetuneConfig.from_tree(tree)
    tree["execution"] = {"dispatch": tree["moe"].pop("dispatch")}
    assert FinetuneConfig.from_tree(tree).execution.dispatch == "fixed"

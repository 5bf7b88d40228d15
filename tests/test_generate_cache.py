"""Decoding: the KV cache equals the forward, batches of prompts, and the fixed decode dispatch.

- Transformer.decode with a KV cache gives the logits of the forward over the
  whole sequence at every step (fp32, 1e-5), one process and under expert
  parallelism; a left-padded batch gives each row its logits alone.
- generate with the cache gives the bytes of generate without it (greedy and
  sampled with the same generator), for one prompt and for three prompts of
  different lengths, also past seq_len; generation routes dropless unless told.
- ExecutionConfig(dispatch="fixed") equals the per-assignment dispatch on 2 and
  4 ranks: outputs, routing, statistics and gradients, with a rank without
  tokens and with every token on one expert. The layer picks it by itself for
  an eval decode step with a token bound; one decode step then runs exactly
  two all-to-alls per MoE layer and no other collective, and the dispatch,
  experts and combine read nothing back to the host.
- A rank that dies mid-decode makes its peers raise CollectiveError.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from asserts import assert_close, assert_equal
from collectives import counting_collectives
from decode_death import SURVIVOR_EXIT
from multirank import launch
from rankpool import on_ranks
from test_failures import kill_victim_when_ready

import expert_parallel as ep
from expert_parallel import layer as layer_module
from expert_parallel.comm import ExchangeClock
from expert_parallel.dispatchers import (
    AUTO_FIXED_MAX_ROWS,
    AllToAllDispatcher,
    ExpertLayout,
    FixedDispatcher,
    LocalDispatcher,
    for_call,
)
from expert_parallel.layer import Inference
from expert_parallel.model import ModelConfig, Transformer
from expert_parallel.parallel import shard_experts
from expert_parallel.placement import balance

D = 32
MOE = ep.MoEConfig(d_model=D, d_hidden=16, num_experts=8, top_k=2)
SMALL = ep.MoEConfig(d_model=12, d_hidden=16, num_experts=4, top_k=2)  # for the layer alone
MODEL = ModelConfig(seq_len=24, d_model=D, n_layers=4, n_heads=4, moe=MOE, moe_every=2)  # MoE blocks 1, 3


def build(config: ModelConfig = MODEL, seed: int = 0, group=None) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config)
    if group is not None:
        shard_experts(model, group)
    return model.eval()  # after sharding: the sharded layers are new modules


def tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def decode_step_by_step(model: Transformer, tokens_BS: torch.Tensor, prefill: int, **options) -> torch.Tensor:
    """[B, S, V]: prefill the first `prefill` tokens, then one token at a time against the cache."""
    logits_BSV, cache = model.decode(tokens_BS[:, :prefill], **options)
    steps = [logits_BSV]
    for i in range(prefill, tokens_BS.shape[1]):
        logits_B1V, cache = model.decode(tokens_BS[:, i : i + 1], cache, **options)
        steps.append(logits_B1V)
    assert cache.length == tokens_BS.shape[1]
    return torch.cat(steps, dim=1)


@torch.no_grad()
def test_cached_decode_gives_the_forwards_logits_at_every_step():
    model = build()
    tokens_BS = tokens(2, 20)
    want = model(tokens_BS)[0]
    got = decode_step_by_step(model, tokens_BS, prefill=6)
    assert_close("cached logits", got, want, tol=1e-5)
    # The cache is a value: decoding from an old cache again gives the same step.
    _, cache = model.decode(tokens_BS[:, :6])
    first, _ = model.decode(tokens_BS[:, 6:7], cache)
    again, _ = model.decode(tokens_BS[:, 6:7], cache)
    assert torch.equal(first, again) and cache.length == 6


@torch.no_grad()
def test_a_left_padded_batch_gives_each_row_its_logits_alone():
    model = build()
    rows = [tokens(n, seed=n) for n in (4, 11, 7)]
    width = 11
    tokens_BS = torch.stack([torch.cat([torch.zeros(width - r.numel(), dtype=torch.long), r]) for r in rows])
    valid_BS = torch.stack([torch.arange(width) >= width - r.numel() for r in rows])
    logits_BSV, cache = model.decode(tokens_BS[:, :8], valid_BS=valid_BS[:, :8])
    steps = [logits_BSV]
    for i in range(8, width):
        logits_B1V, cache = model.decode(tokens_BS[:, i : i + 1], cache)
        steps.append(logits_B1V)
    got = torch.cat(steps, dim=1)
    for b, row in enumerate(rows):
        want = model(row.unsqueeze(0))[0][0]
        assert_close(f"row {b}", got[b, width - row.numel() :], want, tol=1e-5)
        assert torch.isfinite(got[b]).all()  # padding queries see themselves: no NaN anywhere


def test_decode_refuses_more_columns_than_the_position_embedding():
    model = build()
    _, cache = model.decode(tokens(1, 24))
    with pytest.raises(ValueError, match="24 cached columns and 1 new ones exceed seq_len=24"):
        model.decode(tokens(1, 1), cache)
    with pytest.raises(ValueError, match="must agree on B"):
        model.decode(tokens(2, 1), model.decode(tokens(1, 3))[1])


@pytest.mark.parametrize("lengths", [(5,), (3, 9, 6)], ids=["batch1", "batch3"])
def test_cached_generation_gives_the_bytes_of_generation_without_a_cache(lengths):
    model = build()
    prompts = [tokens(n, seed=n) for n in lengths]
    # 30 new tokens: past seq_len=24, so the window slides and the cache is refilled.
    cached = model.generate(prompts, 30, temperature=0)
    plain = model.generate(prompts, 30, temperature=0, use_cache=False)
    alone = [model.generate(p, 30, temperature=0, use_cache=False) for p in prompts]
    for b, prompt in enumerate(prompts):
        assert cached[b].shape == (prompt.numel() + 30,) and torch.equal(cached[b][: prompt.numel()], prompt)
        assert torch.equal(cached[b], plain[b]), f"row {b}"
        assert torch.equal(cached[b], alone[b]), f"row {b} in a batch differs from the prompt alone"
    sampled = model.generate(prompts, 30, top_k=20, generator=torch.Generator().manual_seed(7))
    again = model.generate(prompts, 30, top_k=20, generator=torch.Generator().manual_seed(7), use_cache=False)
    assert all(torch.equal(a, b) for a, b in zip(sampled, again))
    one = model.generate(prompts[0], 4, temperature=0)  # one prompt in, one tensor out
    assert isinstance(one, torch.Tensor) and torch.equal(one, cached[0][: lengths[0] + 4])


@torch.no_grad()
def test_generation_routes_dropless_whatever_the_training_capacity():
    """Trained with capacity 0.5 (which drops here), generation routes as the dropless model does;
    capacity_factor=0.5 asks for the training-time rule on each call's tokens."""
    dropping = replace(MODEL, moe=replace(MOE, capacity_factor=0.5, min_capacity=1))
    trained, dropless = build(dropping), build(MODEL)
    tokens_BS = tokens(2, 20)
    assert not torch.allclose(trained(tokens_BS)[0], dropless(tokens_BS)[0], atol=1e-3)  # it does drop
    assert_close("dropless decode", trained.decode(tokens_BS)[0], dropless(tokens_BS)[0], tol=1e-5)
    with_rule = trained.decode(tokens_BS, capacity_factor=0.5)[0]
    assert_close("the training-time rule", with_rule, trained(tokens_BS)[0], tol=1e-5)
    prompts = [tokens(6, seed=2), tokens(3, seed=3)]
    for got, want in zip(
        trained.generate(prompts, 10, temperature=0), dropless.generate(prompts, 10, temperature=0)
    ):
        assert torch.equal(got, want)


def test_the_automatic_pick_of_the_fixed_dispatch():
    """Only for a stated bound, in eval mode without gradients, and for a small padded exchange."""
    clock = ExchangeClock()
    layout = ExpertLayout(rank=0, size=4, num_local_experts=2)
    normal = AllToAllDispatcher(layout, ep.ExecutionConfig(), "group", "here", clock)
    decode = dict(training=False, grad_enabled=False)
    picked = for_call(normal, 8, **decode)
    assert isinstance(picked, FixedDispatcher) and picked.tokens_per_rank == 8
    assert for_call(normal, None, **decode) is normal  # no agreed bound: nothing to size the slots by
    assert for_call(normal, 8, training=True, grad_enabled=False) is normal
    assert for_call(normal, 8, training=False, grad_enabled=True) is normal
    largest = AUTO_FIXED_MAX_ROWS // 8  # E' = 8 physical experts
    assert isinstance(for_call(normal, largest, **decode), FixedDispatcher)
    assert for_call(normal, largest + 1, **decode) is normal
    capped = AllToAllDispatcher(layout, ep.ExecutionConfig(max_tokens_per_expert=31), "group", "here", clock)
    assert for_call(capped, 8, **decode) is capped  # 4 ranks x 8 slots per expert > 31
    local = LocalDispatcher(layout, ep.ExecutionConfig(), "here")
    assert for_call(local, 8, **decode) is local
    fixed = FixedDispatcher(layout, ep.ExecutionConfig(dispatch="fixed"), "group", "here", clock)
    assert for_call(fixed, None, training=True, grad_enabled=True) is fixed  # configured: always
    assert for_call(fixed, 5, training=True, grad_enabled=True).tokens_per_rank == 5


def test_fixed_is_a_dispatch_mode_of_the_execution_config():
    assert ep.ExecutionConfig(dispatch="fixed").dispatch == "fixed"
    with pytest.raises(ValueError, match="exchange_chunks=2 needs dispatch='per_assignment'"):
        ep.ExecutionConfig(dispatch="fixed", exchange_chunks=2)


@on_ranks(2, 4)
def test_cached_decode_under_expert_parallelism_equals_the_single_process_forward():
    """Each rank decodes its own two prompts (different lengths, left-padded) on the sharded model;
    every step's logits equal the one-process model's forward of each row alone, and greedy
    generation gives the one-process model's bytes. The one-token steps with a bound use the fixed
    dispatch: two all-to-alls per MoE layer and nothing else; the last step, without, does not."""
    rank, group = dist.get_rank(), dist.group.WORLD
    reference, model = build(), build(group=group)
    rows = [tokens(3 + 2 * rank, seed=10 * rank), tokens(8, seed=10 * rank + 1)]
    width = 9  # the longest row of any rank, so every rank runs the same forwards
    tokens_BS = torch.stack([torch.cat([torch.zeros(width - r.numel(), dtype=torch.long), r]) for r in rows])
    valid_BS = torch.stack([torch.arange(width) >= width - r.numel() for r in rows])
    collectives = {"fixed": Counter(), "normal": Counter()}
    with torch.no_grad():
        logits_BSV, cache = model.decode(tokens_BS, valid_BS=valid_BS)
        steps = [logits_BSV]
        for i in range(6):
            next_B1 = steps[-1][:, -1].argmax(dim=-1, keepdim=True)
            tokens_BS = torch.cat([tokens_BS, next_B1], dim=1)
            bound = 2 if i < 5 else None
            with counting_collectives() as counts:
                logits_B1V, cache = model.decode(next_B1, cache, tokens_per_rank=bound)
            collectives["fixed" if bound else "normal"].update(counts)
            steps.append(logits_B1V)
        got = torch.cat(steps, dim=1)
        generated = model.generate(rows, 6, temperature=0, width=width)
        for b, row in enumerate(rows):
            sequence = tokens_BS[b, width - row.numel() :]
            assert_close(
                f"row {b}", got[b, width - row.numel() :], reference(sequence.unsqueeze(0))[0][0], tol=1e-5
            )
            assert torch.equal(generated[b], sequence), f"row {b}: greedy bytes"
            assert torch.equal(generated[b], reference.generate(row, 6, temperature=0)), f"row {b} alone"
    assert collectives["fixed"] == {"all_to_all_single": 5 * 2 * 2}, collectives  # 5 steps, 2 MoE layers
    assert collectives["normal"] == {"all_to_all_single": 2 * 2, "all_gather": 2}, collectives


def _fixed_case(case: str, size: int, rank: int):
    """(config, every rank's token count, the layer's forced expert ids and placement) per case."""
    config = replace(SMALL, num_experts=2 * size, z_loss_coef=0.01)
    counts = [3 + 2 * r for r in range(size)]  # at most 9: E' x 9 slots stay within AUTO_FIXED_MAX_ROWS
    forced = placement = None
    if case == "a-rank-without-tokens":
        counts[1] = 0
    if case == "capacity-drops":
        config = replace(config, capacity_factor=0.5, min_capacity=1)
    if case == "all-on-one-expert":  # every token's first choice is expert 0, on rank 0
        seconds = torch.randint(
            1, config.num_experts, (counts[rank],), generator=torch.Generator().manual_seed(rank)
        )
        forced = torch.stack([torch.zeros_like(seconds), seconds], dim=1)
    if case == "swiglu-top3-shared":
        config = replace(config, top_k=3, activation="swiglu", bias=False, num_shared_experts=1)
    if case == "weights-on-expert-input":  # Llama 4: each (token, choice) travels as its own row
        config = replace(config, scale_expert_input=True)
    if case == "redundant-experts":  # one replica more per rank, placed for a skewed load
        placement = balance(1.0 / torch.arange(1.0, config.num_experts + 1), size, size)
    return config, counts, forced, placement


def _layer_step(config, execution, num_tokens, bound, forced, placement, train: bool):
    """(output, input grad, routing, parameter grads, collectives) of one step."""
    rank = dist.get_rank()
    torch.manual_seed(3)
    layer = ep.MoELayer(config, dist.group.WORLD, execution=execution, placement=placement)
    layer.train(train)
    layer.forced_expert_ids = forced
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(num_tokens, config.d_model, generator=gen).requires_grad_(train)
    upstream = torch.randn(num_tokens, config.d_out, generator=gen)
    routed = []
    original = layer_module.route

    def recording_route(*args, **kwargs):
        routed.append(original(*args, **kwargs))
        return routed[-1]

    layer_module.route = recording_route
    try:
        with torch.set_grad_enabled(train), counting_collectives() as counts:
            out = layer(x, inference=Inference(config.capacity_factor, bound))
            if train:
                ((out.out * upstream).sum() + out.aux_loss).backward()
    finally:
        layer_module.route = original
    (routing,) = routed
    grads = {name: p.grad for name, p in layer.named_parameters()} if train else {}
    return out, x.grad, routing, grads, counts


@pytest.mark.parametrize(
    "case",
    [
        "random",
        "a-rank-without-tokens",
        "all-on-one-expert",
        "capacity-drops",
        "swiglu-top3-shared",
        "redundant-experts",
        "weights-on-expert-input",
    ],
)
@on_ranks(2, 4)
def test_the_fixed_dispatch_equals_the_per_assignment_dispatch(case):
    """Forward and backward, in training mode (it is differentiable), the bound the largest rank's
    tokens; then the automatic pick in an eval forward without gradients."""
    rank, size = dist.get_rank(), dist.get_world_size()
    config, counts, forced, placement = _fixed_case(case, size, rank)
    bound, num_tokens = max(counts), counts[rank]
    e = config.num_experts // size + (placement is not None)  # physical experts per rank
    runs = {}
    for name, execution, train in [
        ("normal", ep.ExecutionConfig(), True),
        ("fixed", ep.ExecutionConfig(dispatch="fixed"), True),
        ("normal eval", ep.ExecutionConfig(), False),
        ("auto eval", ep.ExecutionConfig(), False),
    ]:
        runs[name] = _layer_step(
            config, execution, num_tokens, None if name == "normal eval" else bound, forced, placement, train
        )
    for want_name, got_name in [("normal", "fixed"), ("normal eval", "auto eval")]:
        (want, want_dx, want_routing, want_grads, want_counts) = runs[want_name]
        (got, got_dx, got_routing, got_grads, got_counts) = runs[got_name]
        where = f"{case}, {got_name}"
        assert_close(f"{where}: output", got.out, want.out, tol=1e-5)
        assert_equal(f"{where}: aux loss", got.aux_loss, want.aux_loss)
        assert_equal(f"{where}: expert ids", got_routing.expert_ids, want_routing.expert_ids)
        assert_equal(f"{where}: weights", got_routing.weights, want_routing.weights)
        assert_equal(f"{where}: keep", got_routing.keep, want_routing.keep)
        for field in ("tokens_per_expert", "choices_per_expert", "num_dropped"):
            assert_equal(f"{where}: {field}", getattr(got.stats, field), getattr(want.stats, field))
        assert (got.stats.num_routed, got.stats.capacity) == (want.stats.num_routed, want.stats.capacity)
        # The padded exchange sends every slot meant for another rank, filled or not.
        assert int(got.stats.rows_sent_to_other_ranks) == (size - 1) * e * bound
        if want_dx is not None:
            assert_close(f"{where}: input grad", got_dx, want_dx, tol=1e-5)
        for pname, grad in want_grads.items():
            assert_close(f"{where}: grad {pname}", got_grads[pname], grad, tol=1e-5)
        assert want_counts["all_gather"] == 1, want_counts  # the normal path's count exchange
        assert got_counts == {"all_to_all_single": 4 if got_name == "fixed" else 2}, got_counts


@on_ranks(2)
def test_the_fixed_dispatch_reads_nothing_back_to_the_host():
    """A whole decode-step forward of the layer with Tensor.item / tolist / bool / int / float
    refused: every size comes from the bound, P and E', and the NaN checks are skipped."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    layer = ep.MoELayer(SMALL, dist.group.WORLD).eval()
    x = torch.randn(3 + rank, 12)
    dispatcher = for_call(layer.dispatcher, 4, training=False, grad_enabled=False)
    assert isinstance(dispatcher, FixedDispatcher)
    with torch.no_grad():
        want = layer(x).out

        def refuse(*args, **kwargs):
            raise AssertionError("a host read inside the fixed dispatch")

        names = ("item", "tolist", "__bool__", "__int__", "__float__")
        originals = {name: getattr(torch.Tensor, name) for name in names}
        for name in names:
            setattr(torch.Tensor, name, refuse)
        try:
            out_TO = layer(x, inference=Inference(tokens_per_rank=4)).out
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)
    assert_close("fixed dispatch", out_TO, want, tol=1e-5)
    # The price: a NaN is not refused but reaches its own token's output, and only that one.
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer(x)
    with torch.no_grad():
        out_TO = layer(x, inference=Inference(tokens_per_rank=4)).out
    assert out_TO[0].isnan().all() and out_TO[1:].isfinite().all()


@on_ranks(2)
def test_a_rank_over_the_bound_of_the_fixed_dispatch_is_refused():
    """Host-side and before any exchange: here every rank is over it, so every rank raises."""
    torch.manual_seed(0)
    layer = ep.MoELayer(
        SMALL,
        dist.group.WORLD,
        execution=ep.ExecutionConfig(dispatch="fixed"),
    )
    with pytest.raises(ValueError, match="5 tokens on this rank, over the fixed dispatch's bound of 4"):
        layer(torch.randn(5, 12), inference=Inference(tokens_per_rank=4))
    capped = ep.MoELayer(
        SMALL,
        dist.group.WORLD,
        execution=ep.ExecutionConfig(dispatch="fixed", max_tokens_per_expert=7),
    )
    with pytest.raises(ValueError, match="max_tokens_per_expert=7"):
        capped(torch.randn(4, 12))  # 2 ranks x 4 slots per expert
    assert layer(torch.randn(4, 12)).out.shape == (4, 12)  # the ranks are still in step


@pytest.mark.dist
@pytest.mark.slow
def test_a_rank_that_dies_mid_decode_makes_its_peers_raise(tmp_path):
    group_timeout_s = 30
    killer = threading.Thread(target=kill_victim_when_ready, args=(tmp_path,))
    killer.start()
    started = time.monotonic()
    script = Path(__file__).with_name("decode_death.py")
    results = launch(script, 3, [str(tmp_path), str(group_timeout_s)], timeout=120)
    killer.join()
    assert time.monotonic() - started < group_timeout_s + 60
    victim, survivors = results[-1], results[:-1]
    assert victim.returncode == -9, victim.output[-3000:]
    for survivor in survivors:
        assert survivor.returncode == SURVIVOR_EXIT, survivor.output[-3000:]
        assert "MoE all-to-all (fixed dispatch, forward) failed on global rank" in survivor.output
        seconds = float(re.search(r"raised after ([\d.]+) s", survivor.output).group(1))
        assert seconds < group_timeout_s  # gloo notices the closed connection

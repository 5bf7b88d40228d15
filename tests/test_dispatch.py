"""Local token movement and the grouped expert GEMM, against plain loops."""

from dataclasses import replace

import pytest
import torch

from expert_parallel import ExecutionConfig, MoEConfig, MoELayer, route
from expert_parallel.dispatchers import check_expert_load, chunk_bounds
from expert_parallel.experts import grouped_linear
from expert_parallel.permutation import (
    combine,
    expand_by_expert,
    inverse_permutation,
    permute,
    permute_rows,
    plan_dispatch,
    plan_rank_dispatch,
    source_to_expert_order,
    sum_rows,
    weighted_sum,
)
from expert_parallel.router import Routing


def _routing(expert_ids: torch.Tensor, keep: torch.Tensor, num_experts: int) -> Routing:
    """A Routing with the given choices (weights 1) for plans that only read ids and keep."""
    kept = torch.zeros(num_experts, dtype=torch.long).scatter_add_(
        0, expert_ids.reshape(-1), keep.reshape(-1).long()
    )
    zero = torch.zeros(())
    return Routing(expert_ids, keep.float(), keep, kept, zero, zero, None, kept, torch.zeros(num_experts))


def test_plan_groups_kept_rows_by_expert_in_token_order():
    logits = torch.tensor([[0.0, 3, 2], [3.0, 0, 2], [0.0, 2, 3], [3.0, 2, 0]])
    routing = route(
        logits, MoEConfig(d_model=2, d_hidden=2, num_experts=3, top_k=2, capacity_factor=1.0, min_capacity=0)
    )
    # choices: t0 -> (1, 2), t1 -> (0, 2), t2 -> (2, 1), t3 -> (0, 1); C = ceil(8 / 3) = 3
    # expert 2 queue: (k0,t2) (k1,t0) (k1,t1): all fit. Nothing dropped.
    plan = plan_dispatch(routing)
    assert plan.rows_per_expert == [2, 3, 3]
    assert plan.token_R.tolist() == [1, 3, 0, 2, 3, 0, 1, 2]
    assert plan.slot_R.tolist() == [2, 6, 0, 5, 7, 1, 3, 4]
    assert plan.row_N.tolist() == [2, 5, 0, 6, 7, 3, 1, 4]  # slot n went to row row_N[n]


def test_dropped_slots_point_past_the_last_row():
    logits = torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    cfg = MoEConfig(d_model=2, d_hidden=2, num_experts=2, top_k=1, capacity_factor=0.5, min_capacity=0)
    plan = plan_dispatch(route(logits, cfg))  # C = ceil(0.5 * 3 / 2) = 1: t1 and t2 dropped
    assert plan.row_N.tolist() == [0, 1, 1] and plan.num_rows == 1
    out = combine(torch.ones(1, 4), torch.ones(3, 1), plan)
    assert out.tolist() == [[1.0] * 4, [0.0] * 4, [0.0] * 4]


def test_permute_then_combine_is_the_weighted_sum_of_a_per_token_loop():
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=6, d_hidden=6, num_experts=5, top_k=3, capacity_factor=0.6, min_capacity=0)
    x = torch.randn(20, 6)
    routing = route(torch.randn(20, 5), cfg)
    plan = plan_dispatch(routing)
    rows = permute(x, plan)
    # Fake "expert": add the expert id, so a row's output depends on where it went.
    expert_of_row = torch.repeat_interleave(torch.arange(5), torch.tensor(plan.rows_per_expert))
    y = rows + expert_of_row.unsqueeze(1)
    out = combine(y, routing.weights, plan)
    want = torch.zeros(20, 6)
    for t in range(20):
        for k in range(3):
            if routing.keep[t, k]:
                want[t] += routing.weights[t, k] * (x[t] + routing.expert_ids[t, k])
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("expanded", [False, True])
def test_combine_gradients_are_autograds_of_the_gather_and_product_bitwise(dtype, expanded):
    """combine's backward gathers each row's gradient (its slot's weight times its token's
    gradient) instead of autograd's batched product and scatter-add: the same bits, drops included."""
    torch.manual_seed(5)
    cfg = MoEConfig(d_model=8, d_hidden=8, num_experts=5, top_k=3, capacity_factor=0.7, min_capacity=0)
    routing = route(torch.randn(40, 5), cfg)
    plan = plan_dispatch(routing)
    assert routing.num_dropped > 0
    y = torch.randn(plan.num_rows, 8).to(dtype)
    upstream = torch.randn(40, 8).to(dtype)
    grads = []
    for reference in (False, True):
        y_leaf, weights_leaf = y.clone().requires_grad_(), routing.weights.clone().requires_grad_()
        if reference:  # the gather and product, differentiated by autograd
            padded = torch.nn.functional.pad(y_leaf, (0, 0, 0, 1))
            slots = padded.index_select(0, plan.row_N).view(40, 3, 8)
            out = torch.bmm(weights_leaf.to(dtype).unsqueeze(1), slots).squeeze(1)
        else:
            out = combine(y_leaf, weights_leaf, plan)
        out.sum().backward() if expanded else out.backward(upstream)
        grads.append((out.detach(), y_leaf.grad, weights_leaf.grad))
    for ours, autograds in zip(*grads):
        assert ours.dtype == autograds.dtype and torch.equal(ours, autograds)


def test_permute_gradient_sums_each_tokens_slots_in_choice_order_whatever_the_row_order():
    """With K = 3 and drops, the input gradient is the slot-order sum, bitwise, for rows grouped
    by expert or by any relabelling of the experts (as exchange_chunks does)."""
    torch.manual_seed(1)
    cfg = MoEConfig(d_model=4, d_hidden=4, num_experts=6, top_k=3, capacity_factor=0.7, min_capacity=0)
    x = torch.randn(30, 4)
    routing = route(torch.randn(30, 6), cfg)
    upstream_TK4 = torch.randn(30, 3, 4)
    grads = []
    for relabel in (torch.arange(6), torch.tensor([3, 5, 0, 1, 4, 2])):
        plan = plan_dispatch(replace(routing, expert_ids=relabel[routing.expert_ids]))
        x_leaf = x.clone().requires_grad_()
        rows = permute(x_leaf, plan)
        upstream_R4 = upstream_TK4.reshape(-1, 4)[plan.slot_R]  # each row's slot's upstream gradient
        (rows * upstream_R4).sum().backward()
        grads.append(x_leaf.grad)
    want = torch.zeros(30, 4)
    for k in range(3):  # slot order: choice 0, then 1, then 2
        want += torch.where(routing.keep[:, k : k + 1], upstream_TK4[:, k], 0.0)
    assert routing.num_dropped > 0
    assert torch.equal(grads[0], want) and torch.equal(grads[1], want)


def test_source_to_expert_order_worked_example():
    # P=2, e=2: blocks (p0,j0)=[0] (p0,j1)=[1,2] (p1,j0)=[3,4,5] (p1,j1)=[]
    index = source_to_expert_order([[1, 2], [3, 0]], torch.device("cpu"))
    assert index.tolist() == [0, 3, 4, 5, 1, 2]
    assert inverse_permutation(index).tolist() == [0, 4, 5, 1, 2, 3]
    assert source_to_expert_order([[0, 0], [0, 0]], torch.device("cpu")).numel() == 0


def test_permute_rows_gradient_is_the_inverse_gather():
    index = torch.tensor([2, 0, 3, 1])
    x = torch.randn(4, 3, dtype=torch.double, requires_grad=True)
    assert torch.equal(permute_rows(x, index, inverse_permutation(index)), x[index])
    assert torch.autograd.gradcheck(lambda x: permute_rows(x, index, inverse_permutation(index)), (x,))


def test_grouped_linear_equals_a_loop_with_empty_groups_and_gradients():
    torch.manual_seed(0)
    rows = [3, 0, 5, 1]
    x = torch.randn(9, 4, dtype=torch.double, requires_grad=True)
    w = torch.randn(4, 4, 7, dtype=torch.double, requires_grad=True)
    b = torch.randn(4, 7, dtype=torch.double, requires_grad=True)
    out = grouped_linear(x, w, b, rows)
    want = torch.cat([xg @ w[g] + b[g] for g, xg in enumerate(x.split(rows))])
    torch.testing.assert_close(out, want)
    assert torch.autograd.gradcheck(lambda x, w, b: grouped_linear(x, w, b, rows), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: grouped_linear(x, w, None, rows), (x, w))
    # An expanded (stride-0) upstream gradient, as from out.sum().backward().
    grouped_linear(x, w, b, rows).sum().backward()
    assert w.grad[1].abs().sum() == 0 and b.grad[1].abs().sum() == 0


def test_once_per_rank_plan_sends_each_token_once_per_destination_rank():
    # P=2, e=2 (experts 0,1 on rank 0; 2,3 on rank 1), K=2; the docstring's example plus a dropped choice.
    expert_ids = torch.tensor([[0, 1], [1, 2], [3, 0]])
    keep = torch.tensor([[True, True], [True, True], [True, False]])
    routing = _routing(expert_ids, keep, num_experts=4)
    plan = plan_rank_dispatch(routing, num_ranks=2)
    # pairs (rank, token): (0, t0) (0, t1) (1, t1) (1, t2): t2's choice of expert 0 was dropped
    assert plan.rows_per_rank == [2, 2]
    assert plan.token_R.tolist() == [0, 1, 1, 2]
    assert plan.local_expert_RK.tolist() == [[0, 1], [1, -1], [-1, 0], [1, -1]]
    assert plan.row_TK.tolist() == [[0, 4], [1, 2], [3, 4]]


def test_expand_and_sum_undo_the_once_per_rank_rows():
    local_expert_SK = torch.tensor([[1, 0], [-1, 1], [0, -1]])
    row_A, slot_SK, rows_per_local_expert = expand_by_expert(local_expert_SK, num_local_experts=2)
    assert rows_per_local_expert == [2, 2]
    assert row_A.tolist() == [0, 2, 0, 1]  # expert 0: rows 0, 2; expert 1: rows 0, 1
    assert slot_SK.tolist() == [[2, 0], [4, 3], [1, 4]]
    y_AO = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    weights = torch.tensor([[0.5, 0.25], [9.0, 2.0], [3.0, 9.0]])
    assert weighted_sum(y_AO, weights, slot_SK).tolist() == [[0.5 * 3 + 0.25 * 1], [2.0 * 4], [3.0 * 2]]
    assert sum_rows(torch.tensor([[1.0], [2.0]]), torch.tensor([[0, 1], [1, 2]])).tolist() == [[3.0], [2.0]]


def test_chunk_bounds_split_the_local_experts_into_near_equal_ranges():
    assert chunk_bounds(4, 1) == [(0, 4)]
    assert chunk_bounds(4, 2) == [(0, 2), (2, 4)]
    assert chunk_bounds(4, 3) == [(0, 1), (1, 2), (2, 4)]  # c * 4 // 3: 0, 1, 2, 4
    assert chunk_bounds(3, 5) == [(0, 1), (1, 2), (2, 3)]  # at most one chunk per expert
    assert chunk_bounds(1, 4) == [(0, 1)]


def test_the_expert_load_cap_counts_every_ranks_rows():
    rows_PE = [[3, 1, 0], [2, 0, 4]]  # two ranks' rows for three experts: loads 5, 1, 4
    check_expert_load(rows_PE, ExecutionConfig(), "here")  # no cap
    check_expert_load(rows_PE, ExecutionConfig(max_tokens_per_expert=5), "here")  # at the cap
    with pytest.raises(ValueError) as err:
        check_expert_load(rows_PE, ExecutionConfig(max_tokens_per_expert=4), "MoELayer 'x'")
    words = ["MoELayer 'x'", "expert 0 would receive 5 rows", "ExecutionConfig.max_tokens_per_expert=4"]
    assert all(w in str(err.value) for w in words), str(err.value)


def test_the_single_process_layer_refuses_over_the_cap_too():
    config = MoEConfig(d_model=4, d_hidden=4, num_experts=4, top_k=1)
    layer = MoELayer(config, execution=ExecutionConfig(max_tokens_per_expert=6))
    layer.forced_expert_ids = torch.zeros(6, 1, dtype=torch.long)
    assert layer(torch.randn(6, 4)).out.shape == (6, 4)
    layer.forced_expert_ids = torch.zeros(7, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="expert 0 would receive 7 rows"):
        layer(torch.randn(7, 4))

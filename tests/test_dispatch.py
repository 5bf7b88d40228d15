"""Local token movement and the grouped expert GEMM, against plain loops."""

import torch

from expert_parallel import MoEConfig, route
from expert_parallel.dispatch import (
    combine,
    inverse_permutation,
    permute,
    permute_rows,
    plan_dispatch,
    source_to_expert_order,
)
from expert_parallel.experts import grouped_linear


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

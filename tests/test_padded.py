"""The static-shape capacity path (torch.compile's): padded slots hold exactly plan_dispatch's rows."""

from __future__ import annotations

import torch

import expert_parallel as ep
from expert_parallel.permutation import (
    combine,
    combine_padded,
    permute,
    permute_padded,
    plan_dispatch,
    plan_padded,
    sort_by_id,
)
from expert_parallel.router import route


def test_sort_by_id_keeps_slot_order_within_an_id():
    order, ids, position, counts = sort_by_id(torch.tensor([2, 0, 2, 1, 0]), 4)
    assert order.tolist() == [1, 4, 3, 0, 2]
    assert ids.tolist() == [0, 0, 1, 2, 2]
    assert position.tolist() == [0, 1, 0, 0, 1]
    assert counts.tolist() == [2, 1, 2, 0]


def test_padded_slots_hold_each_experts_rows_in_token_order_then_zeros():
    config = ep.MoEConfig(d_model=4, d_hidden=8, num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=1)
    generator = torch.Generator().manual_seed(0)
    x_TD = torch.randn(10, 4, generator=generator)
    routing = route(torch.randn(10, 4, generator=generator), config)
    capacity = routing.capacity
    assert int(routing.num_dropped) > 0  # the case has drops
    plan, padded = plan_dispatch(routing), plan_padded(routing, capacity)
    rows_RD, slots_ECD = permute(x_TD, plan), permute_padded(x_TD, padded)
    for expert, rows in enumerate(rows_RD.split(plan.rows_per_expert)):
        assert torch.equal(slots_ECD[expert, : rows.shape[0]], rows)
        assert not slots_ECD[expert, rows.shape[0] :].any()
    # Expert outputs laid out either way combine to the same tokens.
    y_RO = rows_RD * 3.0
    torch.testing.assert_close(
        combine_padded(slots_ECD * 3.0, routing.weights, padded), combine(y_RO, routing.weights, plan)
    )

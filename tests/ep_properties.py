"""Property-based EP == single-process checks, run in lockstep on every rank.

Hypothesis is derandomized with no shrinking, so every rank draws the same
cases in the same order and runs the same collectives; after each case the
ranks agree on the verdict, so a failure stops every rank at the same case.
"""

from __future__ import annotations

import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from ep_checks import Checks, compare_with_reference
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import expert_parallel as ep


def layer_cases(size: int):
    @st.composite
    def case(draw):
        num_experts = size * draw(st.integers(1, 4))
        config = ep.MoEConfig(
            d_model=8,
            d_hidden=12,
            d_out=draw(st.sampled_from([8, 5])),
            num_experts=num_experts,
            top_k=draw(st.integers(1, min(num_experts, 4))),
            capacity_factor=draw(st.one_of(st.none(), st.sampled_from([0.05, 0.5, 1.0, 1.25, 4.0]))),
            min_capacity=draw(st.integers(0, 3)),
            drop_policy=draw(st.sampled_from(["position", "probs"])),
            score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
            normalize_weights=draw(st.booleans()),
            activation=draw(st.sampled_from(["relu", "gelu", "silu", "swiglu"])),
            bias=draw(st.booleans()),
            z_loss_coef=0.001,
        )
        counts = draw(
            st.lists(st.one_of(st.sampled_from([0, 1]), st.integers(0, 48)), min_size=size, max_size=size)
        )
        scale = draw(st.sampled_from([1.0, 40.0]))  # 40: saturated, skewed logits
        return config, counts, scale, draw(st.integers(0, 2**20))

    return case()


def main() -> int:
    device = ep.init_distributed(timeout=timedelta(seconds=60))
    group, rank = dist.group.WORLD, dist.get_rank()
    examples = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    seen = []

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(layer_cases(dist.get_world_size()))
    def ep_equals_single_process(case):
        config, counts, scale, seed = case
        checks = Checks()
        compare_with_reference(
            checks, f"case {config} counts {counts}", config, group, seed, scale=scale, counts=counts
        )
        failed = torch.tensor(len(checks.failures), device=device)
        dist.all_reduce(failed)
        seen.append(checks.count)
        assert int(failed) == 0, "\n".join(checks.failures) or "failed on another rank"

    try:
        ep_equals_single_process()
        print(f"rank {rank}: {len(seen)} examples, {sum(seen)} checks passed", flush=True)
        return 0
    except Exception:
        traceback.print_exc()
        return 1
    except BaseException:
        ep.shutdown(barrier=False)  # a rank failing alone must not wait for peers that wait for it
        raise
    finally:
        ep.shutdown()  # no-op after the line above


if __name__ == "__main__":
    sys.exit(main())

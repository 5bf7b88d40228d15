"""CUDA paths: the same layer on a GPU equals the CPU layer; NCCL ranks where there are GPUs for them.

Skipped cleanly on machines without CUDA (CI here has none).
"""

import pytest
import torch
from rankpool import RankPools
from test_multirank import CONTRACT

from expert_parallel import MoEConfig, MoELayer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_cuda
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_cuda_layer_equals_cpu_layer(capacity_factor):
    config = MoEConfig(d_model=32, d_hidden=64, num_experts=8, top_k=2, capacity_factor=capacity_factor)
    torch.manual_seed(0)
    cpu = MoELayer(config)
    torch.manual_seed(0)
    gpu = MoELayer(config).cuda()
    x = torch.randn(200, 32)
    x_cpu, x_gpu = x.clone().requires_grad_(), x.cuda().requires_grad_()
    out_cpu, out_gpu = cpu(x_cpu).out, gpu(x_gpu).out
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-4, atol=1e-4)
    out_cpu.square().sum().backward()
    out_gpu.square().sum().backward()
    torch.testing.assert_close(x_gpu.grad.cpu(), x_cpu.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu.experts.w1.grad.cpu(), cpu.experts.w1.grad, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def nccl_pools():
    pools = RankPools(env={"EXPERT_PARALLEL_BACKEND": "nccl"})
    yield pools
    pools.close()


# The multi-rank contract (tests/test_multirank.py) on NCCL: (test name, its arguments).
NCCL_CASES = [
    *[("test_expert_parallel_equals_single_process", {"case": case}) for case in CONTRACT],
    ("test_once_per_rank_sends_each_token_once_per_rank", {"top_k": 4, "capacity": None}),
    ("test_once_per_rank_sends_each_token_once_per_rank", {"top_k": 2, "capacity": 1.0}),
    ("test_large_capacity_equals_dropless", {}),
    ("test_round_robin_routing_proves_where_each_token_went", {}),
    ("test_the_seed_designs_under_expert_parallelism", {}),
    ("test_configs_that_cannot_run_fail_at_construction_on_every_rank", {}),
    ("test_bad_input_on_one_rank_fails_on_every_rank", {}),
    ("test_backward_completes_when_only_rank_0_input_requires_grad", {"dispatch": "per_assignment"}),
    ("test_backward_completes_when_only_rank_0_input_requires_grad", {"dispatch": "once_per_rank"}),
    ("test_max_tokens_per_expert_refuses_on_every_rank", {}),
    ("test_every_rank_empty", {}),
]


@pytest.mark.dist
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for NCCL ranks")
@pytest.mark.parametrize(
    "name,kwargs", NCCL_CASES, ids=["-".join([n[5:], *map(str, k.values())]) for n, k in NCCL_CASES]
)
def test_nccl_ranks_pass_the_contract_checks(nccl_pools, name, kwargs):
    nccl_pools.run(2, "test_multirank", name, kwargs, timeout=300)

"""CUDA paths: the same layer on a GPU equals the CPU layer; NCCL ranks where there are GPUs for them.

Skipped cleanly on machines without CUDA (CI here has none).
"""

from pathlib import Path

import pytest
import torch
from multirank import assert_all_ranks_succeeded, launch

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
    out_cpu, out_gpu = cpu(x_cpu), gpu(x_gpu)
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-4, atol=1e-4)
    out_cpu.square().sum().backward()
    out_gpu.square().sum().backward()
    torch.testing.assert_close(x_gpu.grad.cpu(), x_cpu.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu.experts.w1.grad.cpu(), cpu.experts.w1.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for NCCL ranks")
def test_nccl_ranks_pass_the_contract_checks():
    results = launch(
        Path(__file__).with_name("ep_checks.py"), 2, timeout=300, env={"EXPERT_PARALLEL_BACKEND": "nccl"}
    )
    assert_all_ranks_succeeded(results)

"""benchmarks.plan: the cost model's formulas against hand-computed cases and a Monte Carlo estimate; CLI."""

import json
import math
import subprocess
import sys
from dataclasses import astuple

import pytest
import torch
from multirank import REPO

from benchmarks.plan import LAYERS, Cluster, Layer, compare, expert_flops, predict, remote_rows, units_hit

NODE = Cluster("node", gpus_per_node=4, nodes=1, gemm_tflops=1.0, intra_gbps=1.0)
TWO_NODES = Cluster("two", gpus_per_node=2, nodes=2, gemm_tflops=1.0, intra_gbps=4.0, inter_gbps=1.0)


def small(**overrides) -> Layer:
    values = dict(d_model=4, d_hidden=8, num_experts=8, top_k=2, tokens=10, bytes=2.0, swiglu=False)
    return Layer(**{**values, **overrides})


def test_expert_flops_by_hand():
    # relu: per row 2*D*H (w1) + 2*H*O (w2) = 2*4*8 + 2*8*4 = 128; T*K = 20 rows.
    assert expert_flops(small()) == 20 * 128
    # swiglu adds w3: + 2*D*H = 64 per row; d_out 6: w2 costs 2*8*6 = 96.
    assert expert_flops(small(swiglu=True)) == 20 * (64 + 64 + 64)
    assert expert_flops(small(d_out=6)) == 20 * (64 + 96)
    # The documented formula 2*T*K*D*H*(3 if swiglu else 2) when O = D.
    mixtral = LAYERS["mixtral"]
    assert expert_flops(mixtral) == 2 * 4096 * 2 * 4096 * 14336 * 3


def test_pair_dispatch_volume_and_time_by_hand():
    # 4 ranks on one node: K*(P-1)/P = 2*3/4 = 1.5 rows per token to other ranks.
    r = predict(small(), NODE, 4)
    assert r["intra_rows_per_token"] == 1.5 and r["inter_rows_per_token"] == 0
    # forward: 10 tokens * 1.5 rows * (D + O) * 2 bytes = 15 * 16 = 240 bytes; backward the same.
    assert r["intra_bytes_fwd"] == 240 and r["intra_bytes_bwd"] == 240
    assert r["a2a_ms_fwd"] == pytest.approx(1e3 * 240 / 1e9)
    assert r["experts_ms_fwd"] == pytest.approx(1e3 * 20 * 128 / 1e12)
    assert r["experts_ms_bwd"] == 2 * r["experts_ms_fwd"]
    total = r["a2a_ms_fwd"] + r["a2a_ms_bwd"]
    assert r["a2a_share"] == pytest.approx(total / (total + 3 * r["experts_ms_fwd"]))
    assert predict(small(), NODE, 1)["a2a_ms_fwd"] == 0 and predict(small(), NODE, 1)["a2a_share"] == 0


def test_two_nodes_split_and_slower_link_wins():
    # P = 4, 2 per node: of the 1.5 remote rows, 1/4*2 = 0.5 stay in the node, 1.0 leave it.
    r = predict(small(), TWO_NODES, 4)
    assert (r["intra_rows_per_token"], r["inter_rows_per_token"]) == (0.5, 1.0)
    # inter: 10 * 1.0 * 16 bytes at 1 GB/s beats intra: 10 * 0.5 * 16 at 4 GB/s.
    assert r["a2a_ms_fwd"] == pytest.approx(1e3 * 160 / 1e9)


def test_latency_and_fp8_dispatch():
    cluster = Cluster("lat", gpus_per_node=4, nodes=1, gemm_tflops=1.0, intra_gbps=1.0, latency_us=10.0)
    r = predict(small(dispatch_bytes=1.0), cluster, 4)
    # forward rows carry D*1 + O*2 = 12 bytes; 3 exchanges x 3 peers x 10 us of latency.
    assert r["intra_bytes_fwd"] == 15 * 12 and r["intra_bytes_bwd"] == 15 * 16
    assert r["a2a_ms_fwd"] == pytest.approx(1e3 * (180 / 1e9 + 9 * 10e-6))
    assert r["a2a_ms_bwd"] == pytest.approx(1e3 * (240 / 1e9 + 6 * 10e-6))


def test_oversubscribed_cpu_slows_by_ranks_per_core():
    cpu = Cluster("cpu", gpus_per_node=64, nodes=1, gemm_tflops=1.0, intra_gbps=1.0, cores_per_node=2)
    two, four = predict(small(), cpu, 2), predict(small(), cpu, 4)
    assert four["experts_ms_fwd"] == 2 * two["experts_ms_fwd"]
    assert four["a2a_ms_fwd"] == pytest.approx(2 * 1e3 * 240 / 1e9)
    # Two other busy processes: 2 ranks + 2 share 2 cores (2x), 4 ranks + 2 (3x).
    busy = Cluster("busy", 64, 1, 1.0, 1.0, cores_per_node=2, background_load=2.0)
    assert predict(small(), busy, 2)["experts_ms_fwd"] == pytest.approx(2 * two["experts_ms_fwd"])
    assert predict(small(), busy, 4)["experts_ms_fwd"] == pytest.approx(3 * two["experts_ms_fwd"])


def test_distinct_units_by_hand():
    # top-8 of 64 on 8 ranks: 8 (1 - C(56,8)/C(64,8)) = 5.43 (the issue measured about 5.5).
    assert units_hit(64, 8, 8) == pytest.approx(8 * (1 - math.comb(56, 8) / math.comb(64, 8)))
    assert units_hit(64, 8, 8) == pytest.approx(5.43, abs=0.01)
    # 4 of 8 groups = ranks: 8 * 1/2 * (1 - C(24,8)/C(32,8)) = 3.72 (about 4); 2 of 8: about 2.
    assert units_hit(64, 8, 8, 8, 4) == pytest.approx(4 * (1 - math.comb(24, 8) / math.comb(32, 8)))
    assert units_hit(64, 8, 8, 8, 2) == pytest.approx(2.0, abs=1e-3)
    assert units_hit(8, 3, 1) == pytest.approx(3)  # a unit per expert: exactly K distinct
    assert units_hit(8, 3, 8) == 1  # one unit holds everything


def monte_carlo(num_experts, top_k, unit, num_groups, group_topk, samples=20000) -> float:
    generator = torch.Generator().manual_seed(0)
    group = num_experts // num_groups
    groups = torch.rand(samples, num_groups, generator=generator).argsort(dim=1)[:, :group_topk]
    allowed = (groups[:, :, None] * group + torch.arange(group)).flatten(1)  # [samples, group_topk * group]
    pick = torch.rand(allowed.shape, generator=generator).argsort(dim=1)[:, :top_k]
    units = allowed.gather(1, pick) // unit
    hit = torch.zeros(samples, num_experts // unit).scatter_(1, units, 1.0)
    return float(hit.sum(dim=1).mean())


@pytest.mark.parametrize(
    "case",
    [
        (64, 8, 8, 1, 1),
        (64, 8, 8, 8, 4),
        (64, 8, 16, 8, 4),
        (64, 8, 4, 8, 2),
        (256, 8, 4, 8, 4),
        (16, 4, 2, 2, 1),
    ],
)
def test_distinct_units_match_monte_carlo(case):
    exact, sampled = units_hit(*case), monte_carlo(*case)
    assert sampled == pytest.approx(exact, abs=0.05), (case, exact, sampled)


def test_rank_and_node_dispatch_rows():
    layer = small(num_experts=64, top_k=8, dispatch="rank", tokens=1)
    intra, inter = remote_rows(layer, 8, 8)
    assert inter == 0 and intra == pytest.approx(units_hit(64, 8, 8) * 7 / 8)
    # across 2 nodes of 4 ranks, "node" sends one row per distinct remote node over the network.
    node = small(num_experts=64, top_k=8, dispatch="node", tokens=1)
    intra, inter = remote_rows(node, 8, 4)
    assert inter == pytest.approx(units_hit(64, 8, 32) / 2)
    assert intra == pytest.approx(units_hit(64, 8, 8) * 7 / 8)
    assert remote_rows(node, 8, 8) == remote_rows(layer, 8, 8)  # one node: the same as "rank"


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="ep=3"):
        predict(small(), NODE, 3)
    with pytest.raises(ValueError, match="ep=16"):
        predict(small(num_experts=16), NODE, 16)
    with pytest.raises(ValueError, match="top_k"):
        small(top_k=5, num_groups=4, group_topk=1)
    with pytest.raises(ValueError, match="dispatch"):
        small(dispatch="token")
    with pytest.raises(ValueError, match="inter_gbps"):
        Cluster("bad", gpus_per_node=8, nodes=2, gemm_tflops=1.0, intra_gbps=1.0)
    with pytest.raises(ValueError, match="no cluster file"):
        Cluster.load("no-such-cluster")


def test_presets_hold_the_rates_their_comments_state():
    shape = {name: astuple(Cluster.load(name))[1:5] for name in ("h100-node", "h100-64", "h800-deepep")}
    # (gpus_per_node, nodes, gemm_tflops, intra_gbps)
    assert shape == {
        "h100-node": (8, 1, 989.0, 450.0),
        "h100-64": (8, 8, 989.0, 450.0),
        "h800-deepep": (8, 8, 989.0, 153.0),
    }
    assert Cluster.load("h100-64").inter_gbps == Cluster.load("h800-deepep").inter_gbps == 50.0
    cpu = Cluster.load("cpu-gloo")
    assert (cpu.cores_per_node, cpu.background_load) == (2, 0.5)
    # 8 ranks on one h100 node: 10 tokens * 2 * 7/8 rows * 16 bytes = 280 bytes at 450 GB/s,
    # plus 3 forward exchanges x 7 peers x 1 us of latency.
    r = predict(small(), Cluster.load("h100-node"), 8)
    assert r["a2a_ms_fwd"] == pytest.approx(1e3 * (280 / 450e9 + 21 * 1e-6))


def plan(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "benchmarks.plan", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_cli_help_and_a_preset():
    help_text = plan("--help").stdout
    for flag in ("--layer", "--cluster", "--ep", "--dispatch", "--json", "--measure", "--compare"):
        assert flag in help_text, flag
    assert "{bench,deepseek-v3,mixtral}" in help_text  # the layer presets
    run = plan("--layer", "deepseek-v3", "--cluster", "h100-64", "--dispatch", "rank")
    assert run.returncode == 0, run.stderr
    assert "| 64 | 8 |" in run.stdout and "a2a share" in run.stdout
    run = plan("--layer", "mixtral", "--cluster", "h100-node", "--ep", "8", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["ep"] == 8


def test_compare_reads_a_bench_json(tmp_path):
    breakdown = {f"{phase} {way}": 10.0 for phase in ("all-to-all", "experts") for way in ("fwd", "bwd")}
    case = {"tokens": 16, "experts": 8, "d_hidden": 8, "top_k": 2, "skew": "router"}
    report = {
        "args": {"d_model": 4, "dtype": "fp32"},
        "cases": [{"case": case, "ranks": 2, "impls": {"breakdown dropless": {"ms": breakdown}}}],
    }
    path = tmp_path / "b2.json"
    path.write_text(json.dumps(report))
    lines = compare([path], NODE).splitlines()
    assert len(lines) == 2 + 4 and lines[2].startswith("| 2 | 16 | all-to-all fwd |")
    # experts fwd: 2*16*2*8*(4+4) = 4096 FLOPs at 1 TFLOP/s = 4.1e-6 ms.
    assert "| 2 | 16 | experts fwd | 0.0 | 10.0 | 0.00 |" in lines

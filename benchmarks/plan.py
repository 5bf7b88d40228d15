"""Cost model of one expert-parallel MoE layer: all-to-all volume and time, expert compute, per EP size.

    python -m benchmarks.plan --layer mixtral --cluster h100-node      # a table, EP = 1, 2, 4, 8
    python -m benchmarks.plan --layer deepseek-v3 --cluster h100-64 --dispatch rank
    python -m benchmarks.plan --measure configs/clusters/cpu-gloo.toml # calibrate: 2 gloo ranks here
    python -m benchmarks.plan --compare /tmp/b2.json /tmp/b4.json --cluster cpu-gloo  # against bench

Clusters are TOML files in configs/clusters/ (a name there, or a path). Layer
presets: bench (benchmarks.bench's default layer), mixtral, deepseek-v3; flags
override their fields.

The model, per rank, per layer, uniform routing (every expert equally likely),
experts placed contiguously, no overlap of communication with compute:
- Rows per token (one row = one token's vector sent to one rank). "pair"
  (this library today): one per (token, expert), K in all, (P-1)/P of them to
  other ranks. "rank" (once-per-rank dispatch): one per distinct destination
  rank. "node": one per distinct destination node over the network (DeepEP's
  forwarding), and one per distinct destination rank other than its own over
  the intra-node links (an upper bound on the NVLink rows).
  Distinct units hit, exactly, for a token choosing group_topk of num_groups
  groups and then top_k of the n = group_topk * E / num_groups experts in them,
  all uniformly without replacement: a unit (a rank or a node, a block of u
  consecutive experts) meets g groups (1 if u <= E/G, else u*G/E), overlapping
  j = min(u, E/G) experts in each; i of its groups are chosen with the
  hypergeometric probability C(g, i) C(G - g, M - i) / C(G, M), and then it is
  missed with probability C(n - i j, K) / C(n, K). E.g. top-8 of 64 experts on
  8 ranks: 8 (1 - C(56, 8) / C(64, 8)) = 5.43 ranks per token; limited to 4 of
  8 groups (groups = ranks): 8 (1/2) (1 - C(24, 8) / C(32, 8)) = 3.72.
- Volume sent to other ranks, forward: rows x (D x dispatch bytes + O x bytes),
  dispatch then combine; backward: the same rows, the gradients, at D x bytes +
  O x bytes. A training step moves forward + backward, about 2x the forward.
- All-to-all time, per exchange: intra-node bytes / intra GB/s and inter-node
  bytes / inter GB/s, the larger of the two (the links run at once), plus
  latency x (P - 1) messages; 3 exchanges forward (counts, dispatch, combine),
  2 backward. Destinations on the same node: (ranks per node - 1) of the P - 1.
- Expert FLOPs, forward: 2 x T x K x H x (D x (2 if swiglu else 1) + O): each
  rank's experts compute T x K rows on average, and a row costs 2 D H (w1),
  2 D H (w3, swiglu) and 2 H O (w2) multiply-adds x 2. Backward: 2x forward
  (input and weight gradients). Time: FLOPs / the GEMM rate.
- A CPU host (cores_per_node set) with more runnable processes (its ranks plus
  background_load, other jobs) than cores slows compute and copies by
  processes / cores.
- All-to-all share = all-to-all time / (all-to-all + expert time), forward + backward.
Not modelled: routing, permutation, load imbalance (times are for the mean
rank; the slowest rank of a skewed load is slower), link contention beyond the
per-GPU rates, the router and shared experts.

Calibration, on this machine: AMD EPYC, 2 cores (AVX2), torch 2.14.1, gloo, 1
thread per rank, fp32, shared with other jobs. `--measure` (2 ranks, 2048
tokens) wrote configs/clusters/cpu-gloo.toml: 70 GFLOP/s per core for the six
GEMMs of an expert's step, 1.11 GB/s all-to-all, 301 us per message, measured
beside 0.5 other runnable processes. Then, right after, once each:
    torchrun --standalone --nproc-per-node 2 -m benchmarks.bench --steps 3 --capacity none \
        --tokens 2048 --json /tmp/b2.json          # and --nproc-per-node 4 ... /tmp/b4.json
    python -m benchmarks.plan --compare /tmp/b2.json /tmp/b4.json --cluster cpu-gloo
The benchmark's breakdown (ms, slowest rank, median of 3) against the prediction:
    ranks  phase            predicted  measured  predicted / measured
    2      all-to-all fwd        10.6      13.8  0.77
    2      all-to-all bwd        10.2      11.2  0.91
    2      experts fwd          305.1     344.5  0.89
    2      experts bwd          610.2     726.8  0.84
    4      all-to-all fwd        31.6      47.7  0.66
    4      all-to-all bwd        29.6      32.0  0.92
    4      experts fwd          549.2     559.9  0.98
    4      experts bwd         1098.4    1166.2  0.94
Seven of eight within 25%; the a2a + experts sum within 15% (936 vs 1096 ms on
2 ranks, 1709 vs 1806 on 4). The miss: the forward count exchange on 4 ranks
oversubscribing 2 cores (forward exceeds backward by 16 ms for equal bytes;
the model charges 6 ms of latency). On this host the figures move with the
other jobs' load: two earlier rounds, beside 4-5 busy processes, missed by up
to 2x either way. Rerun the three commands together, on a quiet host.

Predictions, 4096 tokens per GPU, bf16, swiglu, uniform routing, per layer and
rank (`python -m benchmarks.plan --layer L --cluster C [--dispatch M] [--dispatch-bytes 1]`).
Mixtral-like: D 4096, H 14336, E 8, top-2; DeepSeek-V3-like: D 7168, H 2048,
E 256, top-8, 8 groups, group_topk 4. Both cost 2.89 TFLOP forward per rank:
experts 8.75 ms forward + backward at 989 TFLOP/s. Clusters: h100-node (8 GPUs,
NVLink 450 GB/s), h100-64 (8 x 8, 50 GB/s per GPU between nodes), h800-deepep
(8 x 8 at the rates DeepEP reports: NVLink 153, RDMA 50 GB/s).
    layer, cluster, EP, dispatch       rows/token       MB fwd      a2a ms    a2a
                                       intra / inter    intra/inter fwd / bwd share
    Mixtral, h100-node, 2, pair        1.00 / 0         67 / 0      0.15/0.15   3%
    Mixtral, h100-node, 8, pair        1.75 / 0        117 / 0      0.28/0.27   6%
    DeepSeek-V3, h100-node, 8, pair    7.00 / 0        822 / 0      1.85/1.84  30%
    DeepSeek-V3, h100-node, 8, rank    3.18 / 0        373 / 0      0.85/0.84  16%
    DeepSeek-V3, h100-64, 16, pair     3.50 / 4.00     411 / 470    9.44/9.43  68%
    DeepSeek-V3, h100-64, 64, pair     0.88 / 7.00     103 / 822   16.6/16.6   79%
    DeepSeek-V3, h100-64, 64, rank     0.80 / 6.44      95 / 756   15.3/15.3   78%
    DeepSeek-V3, h100-64, 64, node     7.24 / 3.18     851 / 373    7.65/7.58  64%
    DeepSeek-V3 FP8, h800-deepep, 8, node  3.18 / 0    280 / 0      1.85/2.45  33%
    DeepSeek-V3 FP8, h800-deepep, 64, node 7.24 / 3.18 638 / 280    5.78/7.58  60%
Reading: inside one node the all-to-all is a small share for Mixtral (6%) and
about 30% for DeepSeek-V3's top-8 (16% once per rank). Across nodes at 50 GB/s
per GPU the exchange dominates (about 80%); once-per-rank dispatch barely helps
at EP 64 (4 experts per rank: few tokens hit a rank twice), while one row per
destination node, as DeepEP forwards, cuts the network bytes by more than half (3.18 rather than
7 rows per token under the 4-of-8 group limit). Published figures: DeepEP's
normal kernels reach 153 GB/s over NVLink (of about 160 GB/s on H800) and
43-58 GB/s over RDMA (of about 50 GB/s per 400 Gb/s NIC), in DeepSeek-V3's
pretraining setting (4096 tokens, hidden 7168, top-8 of 4 groups, FP8
dispatch, BF16 combine), i.e. close to the link rates the planner assumes; an
all-to-all that reaches less stretches the a2a times above in proportion.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

CLUSTERS = Path(__file__).resolve().parent.parent / "configs" / "clusters"
DISPATCH_MODES = ("pair", "rank", "node")


@dataclass(frozen=True)
class Layer:
    """One MoE layer as the planner sees it. T tokens per rank; bytes per element of the exchanged rows.

    dispatch_bytes: bytes per element of the forward dispatch (e.g. 1 for FP8); None -> bytes.
    num_groups, group_topk: group-limited routing (1, 1: plain top-k).
    dispatch: "pair", "rank" or "node" (see the module docstring).
    """

    d_model: int
    d_hidden: int
    num_experts: int
    top_k: int
    tokens: int
    bytes: float = 2.0
    dispatch_bytes: float | None = None
    swiglu: bool = True
    num_groups: int = 1
    group_topk: int = 1
    dispatch: str = "pair"
    d_out: int | None = None

    def __post_init__(self):
        for name in ("d_model", "d_hidden", "num_experts", "top_k", "tokens", "num_groups", "group_topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"Layer.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_experts % self.num_groups or self.group_topk > self.num_groups:
            raise ValueError(
                f"Layer: need num_groups | num_experts and group_topk <= num_groups, got num_experts="
                f"{self.num_experts}, num_groups={self.num_groups}, group_topk={self.group_topk}"
            )
        if self.top_k > self.group_topk * self.num_experts // self.num_groups:
            raise ValueError(f"Layer.top_k={self.top_k} exceeds the experts in group_topk groups")
        if self.dispatch not in DISPATCH_MODES:
            raise ValueError(f"Layer.dispatch must be one of {DISPATCH_MODES}, got {self.dispatch!r}")


@dataclass(frozen=True)
class Cluster:
    """Per-GPU (per-rank) rates. GB/s are 1e9 bytes/s per direction; latency per message sent.

    cores_per_node, background_load: for CPU hosts only: the processors the ranks
    of one node share (None: one processor per rank, as with GPUs), and the
    runnable processes of other jobs competing for them. With more runnable
    processes than cores, a rank gets cores / (ranks on the node + background)
    of a core, and its compute and copies slow by the inverse. The rates are
    per whole core.
    """

    name: str
    gpus_per_node: int
    nodes: int
    gemm_tflops: float
    intra_gbps: float
    inter_gbps: float = 0.0
    latency_us: float = 0.0
    cores_per_node: int | None = None
    background_load: float = 0.0
    note: str = ""

    def __post_init__(self):
        for name in ("gpus_per_node", "nodes", "gemm_tflops", "intra_gbps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"cluster {self.name!r}: {name} must be > 0, got {getattr(self, name)}")
        if self.nodes > 1 and not self.inter_gbps > 0:
            raise ValueError(f"cluster {self.name!r}: inter_gbps must be > 0 with {self.nodes} nodes")

    @classmethod
    def load(cls, name_or_path: str) -> Cluster:
        path = Path(name_or_path)
        if not path.is_file():
            path = CLUSTERS / f"{name_or_path}.toml"
        if not path.is_file():
            known = sorted(p.stem for p in CLUSTERS.glob("*.toml"))
            raise ValueError(f"no cluster file {name_or_path!r}; presets in {CLUSTERS}: {known}")
        values = tomllib.loads(path.read_text())
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}")
        return cls(**{"name": path.stem, **values})


LAYERS = {
    "bench": Layer(512, 2048, 8, 2, 4096, bytes=4, swiglu=False),
    "mixtral": Layer(4096, 14336, 8, 2, 4096),
    "deepseek-v3": Layer(7168, 2048, 256, 8, 4096, num_groups=8, group_topk=4),
}


def units_hit(num_experts: int, top_k: int, unit: int, num_groups: int = 1, group_topk: int = 1) -> float:
    """Expected distinct units (blocks of `unit` consecutive experts) that a token's experts fall in."""
    group = num_experts // num_groups
    if num_experts % unit or (unit % group and group % unit):
        raise ValueError(f"unit of {unit} experts must divide {num_experts} and nest with groups of {group}")
    meets, overlap = max(1, unit // group), min(unit, group)
    pool = group_topk * group
    missed = sum(
        math.comb(meets, i)
        * math.comb(num_groups - meets, group_topk - i)
        / math.comb(num_groups, group_topk)
        * math.comb(pool - i * overlap, top_k)
        / math.comb(pool, top_k)
        for i in range(min(meets, group_topk) + 1)
    )
    return num_experts // unit * (1 - missed)


def expert_flops(layer: Layer) -> float:
    """Forward FLOPs of one rank's experts: 2 T K H (D (2 if swiglu else 1) + O)."""
    d_out = layer.d_out or layer.d_model
    return (
        2.0
        * layer.tokens
        * layer.top_k
        * layer.d_hidden
        * (layer.d_model * (2 if layer.swiglu else 1) + d_out)
    )


def remote_rows(layer: Layer, ep: int, per_node: int) -> tuple[float, float]:
    """(intra-node, inter-node) rows per token sent to other ranks; ep ranks, per_node of them on a node."""
    if ep == 1:
        return 0.0, 0.0
    e, k = layer.num_experts, layer.top_k
    groups = (layer.num_groups, layer.group_topk)
    if layer.dispatch == "pair":
        return k * (per_node - 1) / ep, k * (ep - per_node) / ep
    rank_hit = units_hit(e, k, e // ep, *groups) / ep
    if layer.dispatch == "rank" or per_node == ep:
        return (per_node - 1) * rank_hit, (ep - per_node) * rank_hit
    nodes = ep // per_node
    node_hit = units_hit(e, k, e // nodes, *groups) / nodes
    return (ep - 1) * rank_hit, (nodes - 1) * node_hit


def predict(layer: Layer, cluster: Cluster, ep: int) -> dict:
    """Per rank, per layer: rows, bytes (to other ranks) and milliseconds, forward and backward."""
    if layer.num_experts % ep or ep > cluster.gpus_per_node * cluster.nodes:
        raise ValueError(
            f"ep={ep} must divide num_experts={layer.num_experts} and fit the cluster's "
            f"{cluster.gpus_per_node * cluster.nodes} GPUs"
        )
    per_node = min(ep, cluster.gpus_per_node)
    if ep % per_node:
        raise ValueError(f"ep={ep} must be a multiple of gpus_per_node={cluster.gpus_per_node}")
    busy = per_node + cluster.background_load
    slow = max(1.0, busy / cluster.cores_per_node) if cluster.cores_per_node else 1.0
    d_out = layer.d_out or layer.d_model
    intra, inter = remote_rows(layer, ep, per_node)
    row_fwd = layer.d_model * (layer.dispatch_bytes or layer.bytes) + d_out * layer.bytes
    row_bwd = (layer.d_model + d_out) * layer.bytes

    def exchange_ms(row_bytes: float, exchanges: int) -> float:
        t = layer.tokens * row_bytes
        links = intra * t / (cluster.intra_gbps * 1e9), inter * t / (cluster.inter_gbps * 1e9 or 1.0)
        return 1e3 * slow * (max(links) + exchanges * (ep - 1) * cluster.latency_us * 1e-6)

    a2a_fwd = exchange_ms(row_fwd, 3) if ep > 1 else 0.0
    a2a_bwd = exchange_ms(row_bwd, 2) if ep > 1 else 0.0
    flops = expert_flops(layer)
    experts_fwd = 1e3 * slow * flops / (cluster.gemm_tflops * 1e12)
    step = a2a_fwd + a2a_bwd + 3 * experts_fwd
    return {
        "ep": ep,
        "nodes": ep // per_node,
        "intra_rows_per_token": intra,
        "inter_rows_per_token": inter,
        "intra_bytes_fwd": layer.tokens * intra * row_fwd,
        "inter_bytes_fwd": layer.tokens * inter * row_fwd,
        "intra_bytes_bwd": layer.tokens * intra * row_bwd,
        "inter_bytes_bwd": layer.tokens * inter * row_bwd,
        "a2a_ms_fwd": a2a_fwd,
        "a2a_ms_bwd": a2a_bwd,
        "expert_flops_fwd": flops,
        "experts_ms_fwd": experts_fwd,
        "experts_ms_bwd": 2 * experts_fwd,
        "step_ms": step,
        "a2a_share": (a2a_fwd + a2a_bwd) / step,
    }


def table(layer: Layer, cluster: Cluster, eps: list[int] | None = None) -> str:
    size = cluster.gpus_per_node * cluster.nodes
    eps = eps or [p for p in (2**i for i in range(12)) if p <= size and layer.num_experts % p == 0]
    head = "| EP | nodes | rows/token intra / inter | MB fwd intra / inter | a2a ms fwd / bwd |"
    lines = [head + " experts ms fwd / bwd | a2a share |", "|" + "---|" * 7]
    for ep in eps:
        r = predict(layer, cluster, ep)
        lines.append(
            f"| {ep} | {r['nodes']} | {r['intra_rows_per_token']:.2f} / {r['inter_rows_per_token']:.2f} | "
            f"{r['intra_bytes_fwd'] / 1e6:.0f} / {r['inter_bytes_fwd'] / 1e6:.0f} | "
            f"{r['a2a_ms_fwd']:.2f} / {r['a2a_ms_bwd']:.2f} | "
            f"{r['experts_ms_fwd']:.2f} / {r['experts_ms_bwd']:.2f} | {r['a2a_share']:.0%} |"
        )
    return "\n".join(lines)


def bench_breakdowns(path: Path) -> list[tuple[Layer, int, dict]]:
    """(layer, ranks, breakdown ms per "<phase> fwd|bwd") per dropless case of a bench JSON file."""
    report = json.loads(path.read_text())
    args = report["args"]
    bytes_ = 2.0 if args.get("dtype") == "bf16" else 4.0
    if "results" in report:  # the first JSON format: one case, "phases_ms"
        shape = (args["d_model"], args["d_hidden"], args["experts"], args["top_k"], args["tokens"])
        layer = Layer(*shape, bytes=bytes_, swiglu=False)
        return [(layer, report["machine"]["world_size"], report["results"][0]["phases_ms"])]
    found = []
    for case in report["cases"]:
        shape, breakdown = case["case"], case["impls"].get("breakdown dropless")
        if breakdown is None:
            continue
        dims = (args["d_model"], shape["d_hidden"], shape["experts"], shape["top_k"], shape["tokens"])
        found.append((Layer(*dims, bytes=bytes_, swiglu=False), case["ranks"], breakdown["ms"]))
    return found


def compare(paths: list[Path], cluster: Cluster) -> str:
    """Predicted vs measured all-to-all and expert phases of benchmarks.bench's breakdown (fp32 relu)."""
    head = "| ranks | tokens | phase | predicted ms | measured ms | predicted / measured |"
    lines = [head, "|---" * 6 + "|"]
    for path in paths:
        for layer, ranks, phases in bench_breakdowns(path):
            p = predict(layer, cluster, ranks)
            for key, ours in (("all-to-all", "a2a_ms"), ("experts", "experts_ms")):
                for way in ("fwd", "bwd"):
                    want, got = p[f"{ours}_{way}"], phases[f"{key} {way}"]
                    numbers = f"{want:.1f} | {got:.1f} | {want / got:.2f}"
                    lines.append(f"| {ranks} | {layer.tokens} | {key} {way} | {numbers} |")
    return "\n".join(lines)


def _measure_rank(rank: int, size: int, port: int, layer: Layer, out: str, background: float) -> None:
    import torch
    import torch.distributed as dist

    from benchmarks.bench_tools import cpu_model
    from expert_parallel.allocator import keep_freed_memory

    keep_freed_memory()  # as benchmarks.bench does: page faults on fresh buffers halve the GEMM rate here
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:

        def slowest(fn, repeats: int) -> float:
            """Median over repeats of the slowest rank's seconds for fn(), after a barrier and a warm-up."""
            samples = []
            for index in range(repeats + 1):
                dist.barrier()
                start = time.perf_counter()
                fn()
                seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
                samples.append(float(seconds) if index else math.inf)
            return sorted(samples)[repeats // 2]

        d, h = layer.d_model, layer.d_hidden
        rows = layer.tokens * layer.top_k * size // layer.num_experts  # one expert's rows, uniform routing
        x, w1, w2 = torch.randn(rows, d), torch.randn(d, h), torch.randn(h, d)
        g, hid = torch.randn(rows, d), torch.randn(rows, h)

        def gemms():  # the six GEMMs of one expert's forward and backward (relu, no swiglu)
            x @ w1, hid @ w2, g @ w2.T, hid.T @ g, hid @ w1.T, x.T @ hid

        gemm_s = slowest(gemms, 7)
        # NOTE: the rate from the slope of a line through two sizes (the layer's dispatch and a
        # quarter of it), so that the fixed cost per call does not count as bandwidth. Like the
        # layer: split lists, a fresh output per call, and a barrier before each call.
        sizes, seconds = (layer.tokens * layer.top_k, layer.tokens * layer.top_k // 4), []
        for rows_sent in sizes:
            sent, splits = torch.randn(rows_sent, d), [rows_sent // size] * size

            def exchange(x=sent, splits=splits):
                dist.all_to_all_single(x.new_empty(x.shape), x, splits, splits)

            seconds.append(slowest(exchange, 21))
        remote = [n * d * 4 * (size - 1) / size for n in sizes]
        seconds_per_byte = max((seconds[0] - seconds[1]) / (remote[0] - remote[1]), 1e-12)
        tiny = torch.zeros(size)  # latency: one element to each peer, right after a barrier, as the layer's
        message_s = slowest(lambda: dist.all_to_all_single(tiny.new_empty(size), tiny), 21) / (size - 1)
        if rank == 0:
            cores = len(os.sched_getaffinity(0))
            share = min(1.0, cores / (size + background))  # of a core, per rank, while measuring
            text = (
                f"# Measured by `python -m benchmarks.plan --measure` on {size} gloo ranks x 1 thread, "
                f"fp32,\n"
                f"# {cpu_model()}, {cores} cores, torch {torch.__version__}, "
                f"{time.strftime('%Y-%m-%d %H:%M')}.\n"
                f"# GEMM: the six GEMMs of one expert's training step ({rows} rows, D {d}, H {h}).\n"
                f"# all-to-all: all_to_all_single of {sizes[0]} and {sizes[1]} rows of D per rank, the rate\n"
                f"# from the slope; latency: one element per peer, per message. Medians, slowest rank:\n"
                f"# GEMMs {gemm_s * 1e3:.1f} ms, all-to-alls {seconds[0] * 1e3:.2f} and "
                f"{seconds[1] * 1e3:.2f} ms, with {background:.1f} other runnable processes on average\n"
                f"# (background_load): each rank had {share:.2f} of a core, and the rates below are per\n"
                f"# whole core (measured / {share:.2f}).\n"
                f'note = "CPU host, gloo over loopback, 1 thread per rank"\n'
                f"gpus_per_node = 64\nnodes = 1\ncores_per_node = {cores}\n"
                f"background_load = {background:.1f}\n"
                f"gemm_tflops = {6 * 2 * rows * d * h / gemm_s / share / 1e12:.6f}\n"
                f"intra_gbps = {1 / seconds_per_byte / share / 1e9:.4f}\n"
                f"latency_us = {message_s * share * 1e6:.1f}\n"
            )
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(text)
            print(text, end="")
    finally:
        dist.destroy_process_group()


def runnable_elsewhere(seconds: float = 3.0) -> float:
    """Mean number of runnable processes other than this one over `seconds` (/proc/loadavg, 4th field)."""
    samples = []
    for _ in range(int(seconds / 0.1)):
        with open("/proc/loadavg") as handle:
            samples.append(int(handle.read().split()[3].split("/")[0]) - 1)
        time.sleep(0.1)
    return sum(samples) / len(samples)


def measure(out: Path, layer: Layer, ranks: int = 2) -> None:
    """Write a cluster TOML with this machine's GEMM rate, all-to-all rate and latency; `ranks` processes."""
    import socket

    import torch.multiprocessing as mp

    background = runnable_elsewhere()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_measure_rank, args=(ranks, port, layer, str(out), background), nprocs=ranks)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layer", choices=sorted(LAYERS), default="bench", help="layer preset")
    parser.add_argument("--cluster", default="h100-node", help="a name in configs/clusters/ or a TOML path")
    parser.add_argument("--ep", type=lambda s: [int(v) for v in s.split(",")], help="EP sizes, e.g. 8,16,64")
    for field in fields(Layer):
        if field.name not in ("swiglu", "dispatch"):
            kind = float if "bytes" in field.name else int
            parser.add_argument(
                f"--{field.name.replace('_', '-')}", type=kind, help=f"override Layer.{field.name}"
            )
    parser.add_argument("--swiglu", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--dispatch", choices=DISPATCH_MODES)
    parser.add_argument("--json", action="store_true", help="print the predictions as JSON lines")
    parser.add_argument(
        "--measure", type=Path, metavar="OUT", help="measure this machine, write a cluster TOML"
    )
    parser.add_argument("--ranks", type=int, default=2, help="processes for --measure")
    parser.add_argument("--compare", type=Path, nargs="+", metavar="BENCH_JSON", help="bench JSON results")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in fields(Layer) if getattr(args, f.name) is not None}
    layer = replace(LAYERS[args.layer], **overrides)
    if args.measure:
        measure(args.measure, layer, args.ranks)
        return 0
    cluster = Cluster.load(args.cluster)
    if args.compare:
        print(compare(args.compare, cluster))
        return 0
    if args.json:
        for ep in args.ep or [1]:
            print(
                json.dumps({"layer": asdict(layer), "cluster": cluster.name, **predict(layer, cluster, ep)})
            )
        return 0
    print(f"layer {args.layer}: {layer}\ncluster {cluster.name}: {cluster}\n")
    print(table(layer, cluster, args.ep))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

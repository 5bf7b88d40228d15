"""This library against transformers' own expert parallelism, on the same saved Mixtral and tokens.

    pip install -e '.[hf,bench]'        # transformers and accelerate
    python -m benchmarks.hf_side_by_side --ranks 2,4 --rounds 2 --json benchmarks/hf_side_by_side.json

For each world size P, round by round and alternating which goes first, one
torchrun job per implementation on P gloo ranks:
- "ours": `expert_parallel.hf.from_pretrained(dir, WORLD)`: experts sharded
  over P, the dense part replicated;
- "transformers": `AutoModelForCausalLM.from_pretrained(dir,
  distributed_config=DistributedConfig(ep_size=P, fsdp_size=P))`.

Each reports (the worst rank's): load time, peak RSS after loading above
the RSS before it (VmHWM), the median forward + backward step of the
language-model loss on `--batch` x `--seq` tokens per rank, the MoE blocks'
share of it (forward and backward hooks on the blocks), and the largest
logit difference from the plain one-process transformers model on the same tokens.
The model (saved once under --model if it is not there): Mixtral, hidden 512,
intermediate 1024, 8 experts, top-2, 2 layers, vocab 1024, fp32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.bench_tools import machine as bench_machine
from benchmarks.bench_tools import torchrun_result


def save_model(directory: Path) -> None:
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)


def worker(impl: str, directory: str, steps: int, batch: int, seq: int) -> None:
    import torch.distributed as dist
    import transformers
    from transformers.distributed import DistributedConfig

    import expert_parallel as ep
    from expert_parallel import memory
    from expert_parallel.hf import HFMoEBlock, from_pretrained

    ep.init_distributed("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        before, started = memory.rss_mib(), time.perf_counter()
        if impl == "ours":
            model = from_pretrained(directory, dist.group.WORLD)
            blocks = [m for m in model.modules() if isinstance(m, HFMoEBlock)]
        else:
            config = DistributedConfig(ep_size=world, fsdp_size=world)
            model = transformers.AutoModelForCausalLM.from_pretrained(directory, distributed_config=config)
            blocks = [m for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock")]
        load_s, load_mib = time.perf_counter() - started, memory.peak_rss_mib() - before
        model.train()
        moe_s = [0.0]
        for block in blocks:  # forward and backward of each MoE block, timed from its hooks
            block.register_forward_pre_hook(lambda *_: moe_s.append(-time.perf_counter()))
            block.register_forward_hook(lambda *_: moe_s.append(time.perf_counter()))
            block.register_full_backward_pre_hook(lambda *_: moe_s.append(-time.perf_counter()))
            block.register_full_backward_hook(lambda *_: moe_s.append(time.perf_counter()))
        generator = torch.Generator().manual_seed(rank)
        tokens = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
        step_s, moe_step_s = [], []
        for _ in range(steps):
            moe_s.clear()
            started = time.perf_counter()
            loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            step_s.append(time.perf_counter() - started)
            moe_step_s.append(sum(moe_s))
        breakdown = profile_step(model, tokens)
        with torch.no_grad():
            model.eval()
            logits = model(input_ids=tokens[:1], use_cache=False).logits
            reference = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
            diff = (logits - reference(input_ids=tokens[:1], use_cache=False).logits).abs().max().item()
        mine = torch.tensor(
            [load_s, load_mib, statistics.median(step_s[1:]), statistics.median(moe_step_s[1:]), diff],
            dtype=torch.float64,
        )
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        shares = torch.tensor([breakdown[c] for c in CATEGORIES], dtype=torch.float64)
        dist.all_reduce(shares)  # the mean rank's seconds per category
        shares /= world
        if rank == 0:
            names = ("load_s", "load_peak_mib", "step_s", "moe_s", "logits_max_diff")
            row = {"impl": impl, "world": world, **dict(zip(names, mine.tolist()))}
            row["profiled_s"] = dict(zip(CATEGORIES, shares.tolist()))
            print("RESULT " + json.dumps(row))
    finally:
        ep.shutdown()


# Where a profiled step's time goes, by the operators' self time. The attention and the dense
# projections are the same code in both implementations, so the differences are the MoE blocks'.
CATEGORIES = ("gemm", "collectives", "attention", "other")
_GEMMS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm")
_COLLECTIVES = ("alltoall", "all_to_all", "AllToAll", "allreduce", "all_reduce", "allgather", "all_gather",
                "reduce_scatter", "wait_tensor", "c10d::")  # fmt: skip


def category(op: str) -> str:
    if op in _GEMMS:
        return "gemm"
    if any(word in op for word in _COLLECTIVES):
        return "collectives"  # on gloo a collective's self time includes waiting for the slowest rank
    if "scaled_dot_product" in op:
        return "attention"
    return "other"


def profile_step(model, tokens) -> dict[str, float]:
    """Seconds of one more forward + backward step per category (torch.profiler, operators' self time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.key_averages():
        seconds[category(event.key)] += event.self_cpu_time_total / 1e6
    return seconds


def launch(impl: str, world: int, args) -> dict:
    module = ["benchmarks.hf_side_by_side", "--worker", impl, "--model", str(args.model)]
    module += ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
    return torchrun_result(world, module, impl)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("/tmp/ep_side_by_side_mixtral"))
    parser.add_argument("--ranks", default="2,4")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", choices=("ours", "transformers"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, str(args.model), args.steps, args.batch, args.seq)
        return
    if not (args.model / "config.json").is_file():
        save_model(args.model)
    machine = bench_machine()
    print(machine, flush=True)
    results = []
    for world in (int(w) for w in args.ranks.split(",")):
        for r in range(args.rounds):
            order = ("ours", "transformers") if r % 2 == 0 else ("transformers", "ours")
            pair = {impl: launch(impl, world, args) for impl in order}
            for impl in order:
                results.append({"round": r, **pair[impl]})
                print(results[-1], flush=True)
            theirs = pair["transformers"]
            for impl in (i for i in order if i != "transformers"):
                ours = pair[impl]
                print(
                    f"P={world} round {r} {impl}: step {ours['step_s'] / theirs['step_s']:.3f}, "
                    f"MoE blocks {ours['moe_s'] / theirs['moe_s']:.3f}, "
                    f"load memory {ours['load_peak_mib'] / max(theirs['load_peak_mib'], 1e-9):.3f} "
                    "(ours / theirs)",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Generation latency with the experts sharded: prefill, decode steps, their collectives, two dispatches.

    python -m benchmarks.generate_latency --ranks 1,2,4 --json benchmarks/generate_latency.json

For each world size P (one torchrun job each, gloo), each model and each
batch per rank, the byte-level model (random weights: latency does not
depend on them) with its experts sharded over ep = P:
- prefill: one forward over the batch's prompts (`--prompt` tokens each);
- decode: `--tokens` one-token steps against the KV cache (Transformer.decode),
  each giving one new token to every sequence of the batch;
- collectives: the share of a decode step's wall time inside torch.distributed
  calls (all-to-all, all-gather, all-reduce, timed around each call: gloo's
  are blocking, so that includes waiting for the slowest rank).
Two decode dispatches of the same model, alternating which runs first round
by round: "normal" (per-assignment: a count all-gather, then an all-to-all
each way per MoE layer) and "fixed" (the steps told the batch as their
token bound, so the layers pick the fixed dispatch by themselves, as
Transformer.generate's do: one all-to-all each way, no count exchange). The
prefill is the normal dispatch in both. At P = 1 there is no exchange and
one row. Figures: the slowest rank's, the median over --rounds.

Models: "tiny" is configs/tiny.toml's (d_model 128, 4 MoE blocks of 4
experts, top-2, hidden 256); "larger": d_model 512, 4 MoE blocks of 8
experts, top-2, hidden 1024.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.bench_tools import machine as bench_machine
from benchmarks.bench_tools import torchrun_result

MODELS = {
    "tiny": dict(d_model=128, n_heads=4, num_experts=4, d_hidden=256),
    "larger": dict(d_model=512, n_heads=8, num_experts=8, d_hidden=1024),
}
_COLLECTIVES = ("all_to_all_single", "all_gather", "all_gather_into_tensor", "all_reduce")


@contextlib.contextmanager
def timed_collectives():
    """Yield a one-element list that accumulates the seconds spent inside torch.distributed collectives."""
    spent = [0.0]
    originals = {name: getattr(dist, name) for name in _COLLECTIVES}

    def timed(original):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        return call

    for name, original in originals.items():
        setattr(dist, name, timed(original))
    try:
        yield spent
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def measure(model, prompt_BS: torch.Tensor, bound: int | None, tokens: int) -> dict[str, float]:
    """Prefill ms, median decode-step ms and the collectives' share of the decode steps, this rank."""
    dist.barrier()
    start = time.perf_counter()
    logits_BSV, cache = model.decode(prompt_BS)
    prefill_s = time.perf_counter() - start
    steps, in_collectives = [], 0.0
    with timed_collectives() as spent:
        for _ in range(tokens):
            next_B1 = logits_BSV[:, -1:].argmax(dim=-1)
            start, before = time.perf_counter(), spent[0]
            logits_BSV, cache = model.decode(next_B1, cache, tokens_per_rank=bound)
            steps.append(time.perf_counter() - start)
            in_collectives += spent[0] - before
    return {
        "prefill_ms": 1e3 * prefill_s,
        "decode_ms": 1e3 * statistics.median(steps),
        "collective_share": in_collectives / sum(steps),
    }


def worker(args) -> None:
    import expert_parallel as ep
    from expert_parallel.model import ModelConfig, Transformer
    from expert_parallel.parallel import shard_experts

    with ep.distributed() as device:
        rank, world = dist.get_rank(), dist.get_world_size()
        results = []
        for name, shape in MODELS.items():
            moe = ep.MoEConfig(
                d_model=shape["d_model"], d_hidden=shape["d_hidden"], num_experts=shape["num_experts"],
                top_k=2, activation="relu", bias=False,
            )  # fmt: skip
            config = ModelConfig(
                seq_len=args.prompt + args.tokens + 1, d_model=shape["d_model"], n_layers=4,
                n_heads=shape["n_heads"], moe=moe,
            )  # fmt: skip
            torch.manual_seed(0)
            model = Transformer(config).to(device)
            shard_experts(model, dist.group.WORLD if world > 1 else None)
            model.eval()
            # One model: a decode step told its token bound picks the fixed dispatch by itself
            # (dispatchers.for_call), as Transformer.generate's steps do; told none, the normal one.
            dispatches = ("normal", "fixed") if world > 1 else ("normal",)
            bounds = {"normal": None}
            for batch in args.batches:
                prompt_BS = torch.randint(
                    0, 256, (batch, args.prompt), generator=torch.Generator().manual_seed(rank)
                )
                runs = {dispatch: [] for dispatch in dispatches}
                bounds["fixed"] = batch
                with torch.no_grad():
                    for dispatch in dispatches:  # warm-up: first calls pay one-time costs
                        measure(model, prompt_BS.to(device), bounds[dispatch], 2)
                    for r in range(args.rounds):
                        for dispatch in dispatches if r % 2 == 0 else dispatches[::-1]:
                            runs[dispatch].append(
                                measure(model, prompt_BS.to(device), bounds[dispatch], args.tokens)
                            )
                for dispatch, rounds in runs.items():
                    mine = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
                    worst = torch.tensor(list(mine.values()), dtype=torch.float64)
                    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                    row = {"model": name, "world": world, "batch": batch, "dispatch": dispatch}
                    results.append({**row, **dict(zip(mine, worst.tolist()))})
        if rank == 0:
            print("RESULT " + json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--batches", default="1,8", help="prompts per rank")
    parser.add_argument("--prompt", type=int, default=32, help="tokens per prompt")
    parser.add_argument("--tokens", type=int, default=32, help="decode steps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batches = [int(b) for b in str(args.batches).split(",")]
    if args.worker:
        worker(args)
        return
    machine = bench_machine()
    print(machine, flush=True)
    results = []
    for world in (int(w) for w in args.ranks.split(",")):
        module = ["benchmarks.generate_latency", "--worker", "--batches", ",".join(map(str, args.batches))]
        module += ["--prompt", str(args.prompt), "--tokens", str(args.tokens), "--rounds", str(args.rounds)]
        results += torchrun_result(world, module, "generate_latency")
    print("| model | P | batch per rank | dispatch | prefill ms | decode ms per step | in collectives |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['model']} | {r['world']} | {r['batch']} | {r['dispatch']} | {r['prefill_ms']:.1f} | "
            f"{r['decode_ms']:.2f} | {r['collective_share']:.0%} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()

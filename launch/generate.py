"""Print text from a trained model: in one process, or with its experts sharded over torchrun's ranks.

    python -m launch.generate --checkpoint runs/tiny --prompt "def " [--tokens 200] [--temperature 0.8]
    torchrun --standalone --nproc-per-node 2 -m launch.generate --checkpoint runs/tiny \\
        --prompts-file prompts.txt --top-k 1

--checkpoint is a run's out_dir (its latest checkpoint is used) or one
`checkpoints/step_<N>` directory, saved at any ep size. Without torchrun one
process holds all experts. Under torchrun the experts are sharded over
ep = world: each rank builds the model on the meta device and reads from the
checkpoint only the dense tensors and its own experts.

--prompts-file: one prompt a line, generated as a batch (prompts of different
lengths are left-padded and masked). Under torchrun rank r takes prompts r,
r + world, ...; a rank with none left still runs every step, since the
experts' exchanges need every rank. Only rank 0 prints, each prompt's text in
file order, separated by a line of 40 "-".

Decoding uses a KV cache: the prompts are prefilled once, then each new token
runs alone. The MoE layers route dropless, whatever capacity factor the model
was trained with (with a capacity, a later token can push an earlier one out
of a full expert, so decoding token by token could not equal the forward over
the sequence); --capacity-factor applies that rule to each forward instead.
--top-k 1 is greedy: the same text at every world size. Sampled text depends
on the layout: each rank draws from its own generator (--seed, rank).

--record-routes FILE (router record and replay, docs/post-training.md):
rank 0 writes a safetensors file of two tensors, "routes", int16
[B, S, L_moe, K], the logical expert ids every MoE layer chose at every
position, prompt and generated, and "tokens", int32 [B, S], the text, in
file order; rows are left-padded with -1 (in both) to the longest.
`Transformer.forward(tokens, routes=routes)` over a row's real positions
replays them, at any ep size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import expert_parallel as ep
from expert_parallel import checkpoint, tensorfile
from expert_parallel.build import build_model
from expert_parallel.model import ModelConfig, Transformer
from expert_parallel.parallel import make_layout

SEPARATOR = "-" * 40


def find_checkpoint(path: Path) -> tuple[Path, Path]:
    """(checkpoint directory, the run's out_dir) for an out_dir or a step directory."""
    if (path / ".metadata").is_file():
        return path, path.parent.parent
    latest = checkpoint.latest(path / "checkpoints")
    if latest is None:
        raise SystemExit(f"no checkpoint under {path / 'checkpoints'}: train with train.checkpoint_every > 0")
    return latest, path


def read_prompts(args: argparse.Namespace) -> list[bytes]:
    if args.prompts_file is None:
        return [args.prompt.encode()]
    prompts = [line.encode() for line in args.prompts_file.read_text().splitlines() if line]
    if not prompts:
        raise SystemExit(f"{args.prompts_file}: no prompt (one a line)")
    return prompts


def load_model(step_dir: Path, out_dir: Path, device: torch.device) -> tuple[Transformer, int]:
    """The checkpoint's model on `device`, its experts sharded over the world under torchrun; and its step."""
    config = ModelConfig.from_dict(json.loads((out_dir / "config.json").read_text())["model"])
    if not dist.is_initialized():
        model = Transformer(config).to(device)
    else:  # on meta, then only this rank's experts get memory and are read
        model = build_model(config, make_layout(dist.get_world_size(), device.type), device)
    step = checkpoint.load(step_dir, model)
    return model.eval(), step


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--prompts-file", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--capacity-factor", type=float, default=None)
    parser.add_argument("--record-routes", type=Path, default=None, metavar="FILE")
    args = parser.parse_args(argv)

    prompts = read_prompts(args)
    step_dir, out_dir = find_checkpoint(args.checkpoint)
    if "WORLD_SIZE" not in os.environ:
        model, step = load_model(step_dir, out_dir, torch.device("cpu"))
        texts, routes = generate(model, prompts, args, rank=0)
        print_texts([t for t, _ in texts], step_dir, step)
        if args.record_routes is not None:
            save_routes(args.record_routes, texts, routes, model)
        return 0
    # NCCL with one GPU per rank where CUDA is available, else gloo; the group torn down at the end.
    with ep.distributed() as device:
        rank, world = dist.get_rank(), dist.get_world_size()
        model, step = load_model(step_dir, out_dir, device)
        # Every rank reads every prompt, so all agree on the padded width and the batch bound.
        bound, width = math.ceil(len(prompts) / world), max(map(len, prompts))
        mine = generate(model, prompts[rank::world], args, rank, batch_per_rank=bound, width=width)
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(list(zip(*mine)), gathered, dst=0)
        if rank == 0:  # back in file order: prompt i was rank i % world's (i // world)-th
            texts, routes = zip(*(gathered[i % world][i // world] for i in range(len(prompts))))
            print_texts([t for t, _ in texts], step_dir, step)
            if args.record_routes is not None:
                save_routes(args.record_routes, texts, routes, model)
    return 0


def generate(
    model: Transformer,
    prompts: list[bytes],
    args: argparse.Namespace,
    rank: int,
    *,
    batch_per_rank: int | None = None,
    width: int = 0,
) -> tuple[list[tuple[str, list[int]]], list[torch.Tensor | None]]:
    """This rank's (text, token ids) per prompt, and with --record-routes its routes
    [S, L_moe, K] (on the CPU; None without). Under torchrun every rank runs the same
    forwards: the same width, steps and batch bound (the most prompts of any rank)."""
    device = next(model.parameters()).device
    batch = [torch.tensor(list(p), dtype=torch.long, device=device) for p in prompts]
    if not batch:  # nothing left for this rank: a one-byte stand-in keeps it in every exchange
        batch = [torch.zeros(1, dtype=torch.long, device=device)]
    generator = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + rank)
    temperature = 0.0 if args.top_k == 1 else args.temperature
    with torch.no_grad():
        rows = model.generate(
            batch,
            args.tokens,
            temperature,
            args.top_k,
            generator=generator,
            capacity_factor=args.capacity_factor,
            batch_per_rank=batch_per_rank,
            width=width,
            record_routes=args.record_routes is not None,
        )
    routes = [None] * len(rows)
    if args.record_routes is not None:
        rows, routes = rows[0], [r.cpu() for r in rows[1]]
    texts = [(bytes(row.tolist()).decode("utf-8", errors="replace"), row.tolist()) for row in rows]
    return texts[: len(prompts)], routes[: len(prompts)]


def save_routes(path: Path, texts: list[tuple[str, list[int]]], routes: list[torch.Tensor], model) -> None:
    """Write the recording: "routes" int16 [B, S, L_moe, K] and "tokens" int32 [B, S], rows
    left-padded with -1 to the longest (a safetensors file, expert_parallel.tensorfile)."""
    width = max(len(ids) for _, ids in texts)
    _, layers, top_k = routes[0].shape
    routes_BSLK = torch.full((len(texts), width, layers, top_k), -1, dtype=torch.int16)
    tokens_BS = torch.full((len(texts), width), -1, dtype=torch.int32)
    for b, ((_, ids), row_SLK) in enumerate(zip(texts, routes)):
        routes_BSLK[b, width - len(ids) :] = row_SLK.to(torch.int16)
        tokens_BS[b, width - len(ids) :] = torch.tensor(ids, dtype=torch.int32)
    names = ",".join(name for name, _ in model.moe_layers())
    metadata = {"moe_layers": names, "padding": "left, -1"}
    tensorfile.save_file({"routes": routes_BSLK, "tokens": tokens_BS}, path, metadata)
    print(f"# routes {tuple(routes_BSLK.shape)} -> {path}", file=sys.stderr)


def print_texts(texts: list[str], step_dir: Path, step: int) -> None:
    print(f"# {step_dir} (step {step})", file=sys.stderr)
    print(f"\n{SEPARATOR}\n".join(texts))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

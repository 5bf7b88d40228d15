"""Layer demo: an expert-parallel MoE layer, checked against the single-process layer, then trained.

    torchrun --standalone --nproc-per-node 2 -m launch.demo --config configs/demo.toml [section.key=value ...]

Each rank holds num_experts / world_size experts. Step 0 checks that the
expert-parallel output on every rank equals a single-process layer holding
all experts (same seed, so the same weights). Then the layer learns to imitate
a fixed random teacher MoE on random tokens, printing the loss, the dropped
fraction, the expert load and the rows each rank sent to other ranks.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import expert_parallel as ep
from expert_parallel.config_file import command_line


@dataclass(frozen=True)
class DemoSettings:
    tokens_per_rank: int = 512
    steps: int = 30
    lr: float = 3e-3
    seed: int = 0
    log_every: int = 5

    @classmethod
    def from_dict(cls, values: dict) -> DemoSettings:
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"[demo] has no key(s) {unknown}")
        return cls(**values)


def say(*parts: object) -> None:
    if dist.get_rank() == 0:
        print(*parts, flush=True)


def load_balance(stats: ep.RoutingStats) -> tuple[float, float, float]:
    """(dropped fraction, max/mean expert load, rows sent to other ranks per rank), over all ranks."""
    load = stats.tokens_per_expert.double().clone()
    totals = torch.stack(
        [
            stats.num_dropped,
            torch.tensor(stats.num_routed, device=load.device),
            stats.rows_sent_to_other_ranks,
        ]
    ).double()
    dist.all_reduce(load)
    dist.all_reduce(totals)
    dropped, routed, sent = totals.tolist()
    return (
        dropped / max(routed, 1),
        (load.max() / load.mean().clamp_min(1e-9)).item(),
        sent / dist.get_world_size(),
    )


def check_against_single_process(
    config: ep.MoEConfig, layer: ep.MoELayer, x: torch.Tensor, seed: int
) -> float:
    torch.manual_seed(seed)
    reference = ep.MoELayer(config).to(x.device)  # group=None: all experts, the definition of correct
    with torch.no_grad():
        diff = (layer(x).out - reference(x).out).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


def main(argv: list[str]) -> int:
    tree = command_line(__doc__, argv, default_config="configs/demo.toml")
    config = ep.MoEConfig.from_dict(tree.get("moe", {}))
    settings = DemoSettings.from_dict(tree.get("demo", {}))

    with ep.distributed() as device:
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(settings.seed)
        layer = ep.MoELayer(config, dist.group.WORLD).to(device)
        say(
            f"{world} ranks ({dist.get_backend()}), {config.num_experts} experts: "
            f"{layer.num_local_experts} per rank; top-{config.top_k} {config.score_func}, "
            f"capacity factor {config.capacity_factor or 'none (dropless)'}"
        )
        print(f"rank {rank}: {layer.extra_repr()}", flush=True)

        gen = torch.Generator().manual_seed(settings.seed * 1000 + rank + 1)
        x = torch.randn(settings.tokens_per_rank, config.d_model, generator=gen).to(device)
        diff = check_against_single_process(config, layer, x, settings.seed)
        say(f"step 0: expert-parallel output == single-process layer on every rank (max |diff| {diff:.2e})")
        if diff > 1e-4:
            raise RuntimeError(f"expert-parallel output differs from the single-process layer by {diff}")

        torch.manual_seed(settings.seed + 1)
        teacher = ep.MoELayer(config, dist.group.WORLD).to(device).requires_grad_(False)
        optimizer = torch.optim.AdamW(layer.parameters(), lr=settings.lr)
        start = time.perf_counter()
        for step in range(1, settings.steps + 1):
            x = torch.randn(settings.tokens_per_rank, config.d_model, generator=gen).to(device)
            with torch.no_grad():
                target = teacher(x).out
            out, aux_loss, stats = layer(x)
            loss = torch.nn.functional.mse_loss(out, target)
            (loss + aux_loss).backward()
            # The router is replicated: average its gradient so every rank keeps the same router.
            # Expert gradients already hold every rank's tokens (the all-to-all brought them home).
            for param in layer.router.parameters():
                dist.all_reduce(param.grad)
                param.grad /= world
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step % settings.log_every == 0 or step == settings.steps:
                loss_all = loss.detach().clone()
                dist.all_reduce(loss_all)
                dropped, imbalance, sent = load_balance(stats)
                rate = step * settings.tokens_per_rank * world / (time.perf_counter() - start)
                say(
                    f"step {step:3d}  loss {loss_all.item() / world:.4f}  aux {aux_loss.item():.4f}  "
                    f"dropped {dropped:6.2%}  load max/mean {imbalance:.2f}  "
                    f"rows sent/rank {sent:.0f}  {rate:,.0f} tokens/s"
                )
        say(f"done: {settings.steps} steps on {world} ranks in {time.perf_counter() - start:.1f} s")
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

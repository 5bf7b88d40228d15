"""The trainer: a byte-level MoE language model on the Python standard library, data x expert parallel.

`launch.train` is its command line (`run_training(RunConfig.from_tree(...))`);
`launch.finetune` runs the same Trainer over a Hugging Face model
(finetuning.FineTuner).

world = dp x ep ranks on a DeviceMesh: experts are sharded over ep, every rank
reads different micro-batches of the same global batch. Each step covers
train.global_batch sequences in micro-batches of train.micro_batch; routing,
and so capacity, is per micro-batch. Writes <out_dir>/metrics.jsonl (a line
per step), <out_dir>/summary.json and checkpoints under <out_dir>/checkpoints.

Redundant experts: parallel.redundant_experts=R places E + R physical experts
per MoE layer over the ep ranks (placement.balance); parallel.replan_every=N
re-plans every N steps from a moving average of the measured per-expert load
(decay LOAD_EMA_DECAY), moving weights and AdamW state. A run resumes with or
without replicas (checkpoints are keyed by logical expert); it starts from
the placement for a uniform load and re-plans after N steps.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  NOTE: see below
import torch.distributed as dist

from . import checkpoint, data, expert_load, memory, upcycling
from .allocator import keep_freed_memory
from .build import build_model
from .config import ExecutionConfig, check_bool, check_choice, check_int, check_real, from_section
from .config_file import check_sections
from .lifecycle import init_distributed, shutdown_after
from .memory import local_tensor
from .model import ModelConfig, Transformer
from .parallel import Layout, check_optimizer_tracks, expert_parameters, make_layout, sum_gradients
from .placement import balance, contiguous


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    global_batch: int  # sequences per optimizer step
    micro_batch: int  # sequences per forward on one rank
    out_dir: str
    checkpoint_every: int = 0  # 0: never
    seed: int = 0
    lr: float = 3e-3
    min_lr_fraction: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    max_corpus_bytes: int | None = None  # cap on each of train and validation text (None: all)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward
    compile: bool = False  # torch.compile each block (the MoE exchanges run between its graphs)
    compile_backend: str = "inductor"  # torch.compile's backend ("aot_eager": no code generation)
    # glibc malloc keeps freed memory for reuse instead of mapping fresh pages every step (allocator.py).
    # None: yes without FSDP, no with it (FSDP's large transient buffers then fragment the kept heap).
    keep_freed_memory: bool | None = None
    # The compute dtype: "fp32", or "bf16" (FSDP's param dtype with fp32 reductions; autocast
    # without FSDP). bf16 pays only on CPUs with native bf16 (AVX512-BF16, AMX) or GPUs.
    dtype: str = "fp32"
    # A dense run (its out_dir, or one checkpoints/step_<N>) to upcycle into this config's MoE when
    # out_dir holds no checkpoint yet: the run continues at that checkpoint's step, with the dense
    # run's AdamW state carried over (init_optimizer = false: a fresh AdamW); upcycling.py,
    # docs/post-training.md#sparse-upcycling.
    init_from: str | None = None
    init_optimizer: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch", "micro_batch", "eval_every", "eval_batches", "log_every"):
            check_int("train", name, getattr(self, name), minimum=1)
        for name in ("checkpoint_every", "warmup_steps", "seed"):
            check_int("train", name, getattr(self, name), minimum=0)
        for name in ("lr", "min_lr_fraction", "weight_decay", "grad_clip"):
            check_real("train", name, getattr(self, name))
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr!r}")
        check_choice("train", "compile_backend", self.compile_backend, ("inductor", "aot_eager", "eager"))
        check_choice("train", "dtype", self.dtype, ("fp32", "bf16"))
        check_bool("train", "init_optimizer", self.init_optimizer)


@dataclass(frozen=True)
class ParallelConfig:
    ep: int = 1  # expert-parallel size; dp = world / ep
    timeout_s: float = 300.0  # a collective waiting longer than this fails the run
    backend: str | None = None  # None: NCCL where CUDA is available, else gloo
    redundant_experts: int = 0  # R extra physical experts per MoE layer (replicas of the busiest)
    replan_every: int = 0  # re-place the experts every N steps from the measured load; 0: never
    # FSDP2: dense parameters sharded over the world, experts over the dp ranks that hold them
    fsdp: bool = False

    def __post_init__(self) -> None:
        check_int("parallel", "ep", self.ep, minimum=1)
        check_int("parallel", "redundant_experts", self.redundant_experts, minimum=0)
        check_int("parallel", "replan_every", self.replan_every, minimum=0)
        check_bool("parallel", "fsdp", self.fsdp)
        if self.fsdp and self.redundant_experts:
            raise ValueError("parallel.fsdp = true does not support parallel.redundant_experts yet")
        check_real("parallel", "timeout_s", self.timeout_s)
        if self.timeout_s <= 0:
            raise ValueError(f"parallel.timeout_s must be > 0, got {self.timeout_s!r}")
        if self.backend is not None:
            check_choice("parallel", "backend", self.backend, ("gloo", "nccl"))


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    train: TrainConfig
    parallel: ParallelConfig
    execution: ExecutionConfig = ExecutionConfig()  # how the MoE layers run

    SECTIONS = ("model", "moe", "execution", "train", "parallel")

    @classmethod
    def from_tree(cls, tree: dict) -> RunConfig:
        check_sections(tree, cls.SECTIONS)
        model = dict(tree.get("model", {}))
        if "moe" in tree:  # its d_model is the model's (ModelConfig.from_dict)
            model["moe"] = tree["moe"]
        return cls(
            model=ModelConfig.from_dict(model),
            train=from_section(TrainConfig, "train", tree.get("train", {})),
            parallel=from_section(ParallelConfig, "parallel", tree.get("parallel", {})),
            execution=from_section(ExecutionConfig, "execution", tree.get("execution", {})),
        )

    def to_dict(self) -> dict:
        return {
            "model": self.model.to_dict(),
            "execution": self.execution.to_dict(),
            "train": asdict(self.train),
            "parallel": asdict(self.parallel),
        }


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_fraction * lr at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    floor = config.min_lr_fraction
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


LOAD_EMA_DECAY = 0.9  # weight of the past in the moving average of expert load that re-plans use


def global_grad_norm(model: Transformer, layout: Layout, fsdp: bool = False) -> torch.Tensor:
    """L2 norm of the whole model's gradient: dense parts are identical on every rank, experts are sharded.

    A logical expert with n replicas (identical gradients after sync) counts once: each replica 1 / n.
    With fsdp, every gradient is a shard held by one rank: the dense ones over the
    world, the experts over the dp ranks of an ep rank's distinct experts. The
    squares of all ranks' shards then sum to the whole: one all-reduce over the world.
    """
    if fsdp:
        zero = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
        grads = (local_tensor(p.grad) for p in model.parameters() if p.grad is not None)
        total_sq = sum((g.double().square().sum() for g in grads), zero)
        dist.all_reduce(total_sq)
        return total_sq.sqrt()
    experts = expert_parameters(model) if layout.ep > 1 else set()
    replica_weight = {}
    for _, layer in model.moe_layers():
        if layer.placement is not None:
            weight_s = 1.0 / layer.placement.replica_count[layer.local_expert_ids].double()
            replica_weight.update({id(p): weight_s for p in layer.experts.parameters()})

    def squared(p: torch.Tensor) -> torch.Tensor:
        sq = p.grad.double().square()
        if id(p) not in replica_weight:
            return sq.sum()
        return (sq.flatten(1).sum(1) * replica_weight[id(p)].to(sq.device)).sum()

    zero = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    params = [p for p in model.parameters() if p.grad is not None]  # frozen ones have none
    dense_sq = sum((squared(p) for p in params if id(p) not in experts), zero)
    expert_sq = sum((squared(p) for p in params if id(p) in experts), zero)
    if layout.ep_group is not None:
        dist.all_reduce(expert_sq, group=layout.ep_group)
    return (dense_sq + expert_sq).sqrt()


# Called before each training forward with (MoE layers, tokens in the micro-batch, micro-batch index,
# step, rank); benchmarks use it to force routing (benchmarks/train_forced.py).
BeforeForward = Callable[[list, int, int, int, int], None]


class Trainer:
    def __init__(
        self,
        config: RunConfig,
        layout: Layout,
        device: torch.device,
        *,
        before_forward: BeforeForward | None = None,
    ):
        self.config, self.layout, self.device = config, layout, device
        self.before_forward = before_forward
        self.rank = layout.dp_rank * layout.ep + layout.ep_rank  # its place in the layout's world
        train = config.train
        if train.global_batch % (train.micro_batch * layout.world):
            raise ValueError(
                f"train.global_batch={train.global_batch} must be divisible by train.micro_batch * world "
                f"= {train.micro_batch} * {layout.world}"
            )
        self.micro_batches_per_step = train.global_batch // train.micro_batch
        # After imports and the process group, before the model. NOTE: torch.optim's first optimizer
        # imports torch._dynamo (about 100 MiB); this module imports it first, so that the build's
        # figures count the model, not one of torch's imports.
        rss_before_build = memory.rss_mib()
        parallel = config.parallel
        if parallel.fsdp and train.compile:
            raise ValueError("train.compile = true does not support parallel.fsdp = true yet")
        self.fsdp = parallel.fsdp
        bf16 = train.dtype == "bf16"
        torch.manual_seed(train.seed)
        self.model = self.build(param_dtype=torch.bfloat16 if bf16 and parallel.fsdp else None)
        # Without FSDP, bf16 is autocast: fp32 weights and optimizer, bf16 GEMMs.
        self.autocast_dtype = torch.bfloat16 if bf16 and not parallel.fsdp else None
        self.model.activation_checkpointing = train.activation_checkpointing
        if train.compile:
            for block in self.model.blocks:
                block.compile(backend=train.compile_backend)
        moe_layers = [layer for _, layer in self.model.moe_layers()]
        self.load_ema = [torch.zeros(layer.config.num_experts, dtype=torch.float64) for layer in moe_layers]
        if parallel.redundant_experts:
            for layer in moe_layers:  # before any load is measured: the placement for a uniform load
                uniform = torch.ones(layer.config.num_experts)
                layer.apply_placement(balance(uniform, layout.ep, parallel.redundant_experts))
        # NOTE: experts and the rest in separate groups: under FSDP at dp = 1 the experts are plain
        # tensors beside DTensors, and AdamW's foreach kernels take one kind per group.
        experts = expert_parameters(self.model)
        groups = []
        for is_expert in (False, True):  # frozen parameters (LoRA's base) have no optimizer state
            params = [
                p for p in self.model.parameters() if (id(p) in experts) == is_expert and p.requires_grad
            ]
            groups += [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ]
        groups = [group for group in groups if group["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=train.lr, betas=(0.9, 0.95))
        check_optimizer_tracks(self.model, self.optimizer)
        # This rank's; run() adds the peak over the run and every rank's worst.
        self.memory = {
            "rss_before_build_mib": rss_before_build,
            "build_peak_rss_mib": memory.peak_rss_mib(),
            "param_bytes_local": memory.param_bytes_local(self.model),
        }
        self.train_corpus, self.val_corpus = self.load_corpora()
        self.out_dir = Path(train.out_dir)
        self.step = 0
        found = checkpoint.latest(self.out_dir / "checkpoints")
        if found is not None:
            self.step = checkpoint.load(found, self.model, self.optimizer)
            self.say(f"resumed from {found} (step {self.step})")
        elif train.init_from is not None:
            optimizer = self.optimizer if train.init_optimizer else None
            self.step, granularity = upcycling.load_dense(Path(train.init_from), self.model, optimizer)
            self.say(f"upcycled the dense {train.init_from} (step {self.step}, granularity {granularity})")

    @property
    def seq_len(self) -> int:
        """Tokens each training sequence predicts."""
        return self.config.model.seq_len

    def build(self, param_dtype: torch.dtype | None) -> Transformer:
        """The model: on the meta device, then only this rank's experts (and FSDP shards) get memory."""
        parallel = self.config.parallel
        return build_model(
            self.config.model,
            self.layout,
            self.device,
            execution=self.config.execution,
            fsdp=parallel.fsdp,
            param_dtype=param_dtype,
        )

    def load_corpora(self) -> tuple[data.ByteCorpus, data.ByteCorpus]:
        """(train, validation) token streams: the standard library's bytes."""
        return data.load_corpus(max_bytes=self.config.train.max_corpus_bytes)

    def autocast(self):
        """bf16 autocast where train.dtype = "bf16" without FSDP; else a no-op context."""
        return torch.autocast(self.device.type, self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def say(self, *parts: object) -> None:
        if self.rank == 0:
            print(*parts, flush=True)

    def all_sum(self, values: list[float]) -> list[float]:
        if self.layout.world == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def all_max(self, values: list[float]) -> list[float]:
        if self.layout.world == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()

    def train_step(self) -> dict:
        """One optimizer step over the global batch; returns its metrics (identical on every rank)."""
        train, layout = self.config.train, self.layout
        started = time.perf_counter()
        moe_layers = [layer for _, layer in self.model.moe_layers()]
        for layer in moe_layers:  # evaluation's exchanges are not this step's
            layer.exchange_clock.reset()
        batch = data.global_batch(self.train_corpus, self.step, train.global_batch, self.seq_len, train.seed)
        mine = data.micro_batches(batch, self.rank, layout.world, train.micro_batch)
        lm_sum, aux_sum, dropped, routed = 0.0, 0.0, 0, 0
        rank_rows = [1.0, 1.0]  # the worst call's busiest rank rows / mean, before and after balancing
        load_E = [torch.zeros(layer.config.num_experts, dtype=torch.float64) for layer in moe_layers]
        # This step's choices per expert so far, per layer (global-batch aux loss, selection bias).
        choices_E: list[torch.Tensor | None] = [None] * len(moe_layers)
        for micro, tokens in enumerate(mine):
            self.prepare_forward(moe_layers, tokens.shape[0] * (tokens.shape[1] - 1), micro)
            with self.autocast():
                lm_loss, aux_loss, outputs = self.model.loss(tokens.to(self.device), choices_E)
            ((lm_loss + aux_loss) / self.micro_batches_per_step).backward()
            lm_sum, aux_sum = lm_sum + lm_loss.item(), aux_sum + aux_loss.item()
            for i, (moe, load) in enumerate(zip(outputs, load_E)):
                stats = moe.stats
                load += stats.tokens_per_expert.double().cpu()
                dropped, routed = dropped + int(stats.num_dropped), routed + stats.num_routed
                rank_rows = [
                    max(rank_rows[0], float(stats.rank_rows_before)),
                    max(rank_rows[1], float(stats.rank_rows_after)),
                ]
                before = choices_E[i]
                choices_E[i] = (
                    stats.choices_per_expert if before is None else before + stats.choices_per_expert
                )
            del outputs
        exchange_s = sum(layer.exchange_clock.reset() for layer in moe_layers)
        if not self.fsdp:  # FSDP has summed them in the backward
            sum_gradients(self.model, layout)
        grad_norm = global_grad_norm(self.model, layout, self.fsdp)
        if train.grad_clip > 0:
            scale = torch.clamp(train.grad_clip / (grad_norm + 1e-6), max=1.0)
            for param in self.model.parameters():
                if param.grad is not None:  # frozen under LoRA
                    local_tensor(param.grad).mul_(scale.to(param.grad.dtype))
        check_optimizer_tracks(self.model, self.optimizer)
        lr = lr_at(self.step, train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for layer, step_choices_E in zip(moe_layers, choices_E):
            layer.after_optimizer_step(step_choices_E)
        self.step += 1

        totals = self.all_sum(
            [lm_sum, aux_sum, dropped, routed, *[x for load in load_E for x in load.tolist()]]
        )
        loads = torch.tensor(totals[4:]).view(len(moe_layers), -1) if moe_layers else torch.zeros(0, 1)
        imbalance = (loads.max(dim=1).values / loads.mean(dim=1).clamp_min(1e-9)).tolist()
        rank_imbalance = []
        for layer, load in zip(moe_layers, loads):  # rows per ep rank, each replica an equal share
            placement = layer.placement or contiguous(layer.config.num_experts, layout.ep)
            per_rank = placement.rank_load(load)
            rank_imbalance.append(float(per_rank.max() / per_rank.mean().clamp_min(1e-9)))
        self.replan(moe_layers, loads)
        seconds, peak_rss, exchange_s, *rank_rows = self.all_max(
            [time.perf_counter() - started, memory.peak_rss_mib(), exchange_s, *rank_rows]
        )
        tokens = train.global_batch * self.seq_len
        return {
            "step": self.step,
            "loss": totals[0] / self.micro_batches_per_step,
            "aux_loss": totals[1] / self.micro_batches_per_step,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens / seconds,
            "step_time_s": seconds,
            "all_to_all_share": exchange_s / seconds,
            "dropped_fraction": totals[2] / max(totals[3], 1),
            "expert_load_max_over_mean": max(imbalance, default=1.0),
            "expert_load_per_layer": imbalance,
            "rank_load_max_over_mean": max(rank_imbalance, default=1.0),
            # Per forward (the worst of the step's layers and micro-batches): the busiest rank's
            # rows / mean as the experts' owners would run them, and as they ran (balanced dispatch).
            "rank_rows_max_over_mean_before": rank_rows[0],
            "rank_rows_max_over_mean_after": rank_rows[1],
            # Per layer, each expert's share of the step's kept assignments (for expert_load.png).
            "expert_share": (loads / loads.sum(dim=1, keepdim=True).clamp_min(1e-9)).tolist(),
            "peak_rss_mib": peak_rss,  # the worst rank's
        }

    def replan(self, moe_layers: list, loads: torch.Tensor) -> None:
        """Update the load averages; every parallel.replan_every steps re-place each layer's experts.

        `loads` [layers, E] is summed over all ranks, so every rank computes the same placement.
        """
        parallel = self.config.parallel
        for ema, load in zip(self.load_ema, loads):
            ema.mul_(LOAD_EMA_DECAY).add_(load.double(), alpha=1 - LOAD_EMA_DECAY)
        if not parallel.replan_every or self.step % parallel.replan_every:
            return
        for layer, ema in zip(moe_layers, self.load_ema):
            layer.apply_placement(balance(ema, self.layout.ep, parallel.redundant_experts), self.optimizer)

    def prepare_forward(self, moe_layers: list, num_tokens: int, micro: int) -> None:
        """Call the before_forward hook, if any, for the next training forward."""
        if self.before_forward is not None:
            self.before_forward(moe_layers, num_tokens, micro, self.step, self.rank)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-byte loss over fixed validation batches, split across the ranks."""
        train, world = self.config.train, self.layout.world
        size = train.micro_batch
        batches = data.val_batches(self.val_corpus, train.eval_batches * world, size, self.seq_len)
        self.model.eval()
        hooked = self.before_forward is not None  # a hook may have forced the routing
        forced = [(layer, layer.forced_expert_ids) for _, layer in self.model.moe_layers()] if hooked else []
        for layer, _ in forced:  # evaluation routes by the router (micro-batch sizes differ too)
            layer.forced_expert_ids = None
        with self.autocast():
            total = sum(self.model.loss(b.to(self.device))[0].item() for b in batches[self.rank :: world])
        if self.fsdp:  # NOTE: with no backward to follow, FSDP's root keeps its parameters unsharded
            self.model.reshard()
        for layer, ids in forced:
            layer.forced_expert_ids = ids
        self.model.train()
        return self.all_sum([total])[0] / len(batches)

    def run(self) -> dict:
        train = self.config.train
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            (self.out_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        metrics_path = self.out_dir / "metrics.jsonl"
        if self.rank == 0:
            keep_metrics_up_to(metrics_path, self.step)
        started, tokens_done, val_loss, row = time.perf_counter(), 0, None, {"loss": None}
        with open(metrics_path, "a") if self.rank == 0 else _NullFile() as metrics:
            while self.step < train.steps:
                row = self.train_step()
                tokens_done += train.global_batch * self.seq_len
                if self.step % train.eval_every == 0 or self.step == train.steps:
                    row["val_loss"] = val_loss = self.evaluate()
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                if self.step % train.log_every == 0 or self.step == train.steps or self.step == 1:
                    self.log(row, started, tokens_done)
                if train.checkpoint_every and self.step % train.checkpoint_every == 0:
                    saved = checkpoint.save(
                        self.out_dir / "checkpoints", self.step, self.model, self.optimizer
                    )
                    self.say(f"saved {saved}")
        elapsed = time.perf_counter() - started
        if val_loss is None:  # resumed at the last step: nothing trained, still report
            val_loss = self.evaluate()
        summary = {
            "steps": self.step,
            "val_loss": val_loss,
            "final_loss": row["loss"],
            "tokens_per_s": tokens_done / max(elapsed, 1e-9),
            "seconds": elapsed,
            "world": self.layout.world,
            "dp": self.layout.dp,
            "ep": self.layout.ep,
            "params": self.model.num_params(),
            "active_params": self.model.num_params(active_only=True),
            "fsdp": self.fsdp,
            **self.memory_summary(),
        }
        if self.rank == 0:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self.say(expert_load.write_png(metrics_path, self.out_dir / "expert_load.png"))
        return summary

    def memory_summary(self) -> dict:
        """This rank's memory figures, and for each the worst rank's value and which rank that is."""
        mine = {**self.memory, "peak_rss_mib": memory.peak_rss_mib()}
        names = list(mine)
        per_rank = torch.tensor([[float(mine[n]) for n in names]], dtype=torch.float64, device=self.device)
        if self.layout.world > 1:  # NOTE: on the device, which NCCL needs of every buffer
            gathered = [torch.empty_like(per_rank) for _ in range(self.layout.world)]
            dist.all_gather(gathered, per_rank)
            per_rank = torch.cat(gathered)
        per_rank = per_rank.cpu()
        summary: dict = dict(mine)
        for i, name in enumerate(names):
            worst = int(per_rank[:, i].argmax())
            summary[f"worst_{name}"] = {"rank": worst, "value": per_rank[worst, i].item()}
        summary["memory_per_rank"] = {name: per_rank[:, i].tolist() for i, name in enumerate(names)}
        return summary

    def log(self, row: dict, started: float, tokens_done: int) -> None:
        elapsed = time.perf_counter() - started
        rate = tokens_done / elapsed
        remaining = (self.config.train.steps - self.step) * self.config.train.global_batch * self.seq_len
        val = f"  val {row['val_loss']:.4f}" if "val_loss" in row else ""
        self.say(
            f"step {self.step:5d}/{self.config.train.steps}  loss {row['loss']:.4f}{val}  "
            f"aux {row['aux_loss']:.4f}  "
            f"dropped {row['dropped_fraction']:6.2%}  load {row['expert_load_max_over_mean']:.2f}  "
            f"ranks {row['rank_rows_max_over_mean_before']:.2f}->{row['rank_rows_max_over_mean_after']:.2f}  "
            f"{rate:,.0f} tok/s  ETA {remaining / max(rate, 1e-9):.0f} s"
        )


def keep_metrics_up_to(path: Path, step: int) -> None:
    """Drop metric lines past `step`: a resumed run writes them again, as the uninterrupted run did."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


class _NullFile:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, _text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def run_training(
    config: RunConfig, before_forward: BeforeForward | None = None, trainer_class: type[Trainer] = Trainer
) -> int:
    """Set up the process group (under torchrun), train, tear it down; the exit code.

    `trainer_class`: Trainer, or a subclass with its own model and corpora (finetuning.FineTuner).
    """
    device = torch.device("cpu")
    if "WORLD_SIZE" in os.environ:  # under torchrun
        timeout = timedelta(seconds=config.parallel.timeout_s)
        device = init_distributed(config.parallel.backend, timeout=timeout)
    keep = config.train.keep_freed_memory
    if keep is None:
        keep = not config.parallel.fsdp
    allocator = "glibc malloc defaults (train.keep_freed_memory = false)"
    if keep:
        allocator = keep_freed_memory()
    with shutdown_after():
        layout = make_layout(config.parallel.ep, device.type)
        trainer = trainer_class(config, layout, device, before_forward=before_forward)
        trainer.say(f"allocator: {allocator}")
        trainer.say(
            f"{layout.world} rank(s): dp {layout.dp} x ep {layout.ep}; "
            f"{trainer.model.num_params() / 1e6:.2f}M parameters, "
            f"{trainer.model.num_params(active_only=True) / 1e6:.2f}M active per token; "
            f"corpus {len(trainer.train_corpus):,} train / {len(trainer.val_corpus):,} validation tokens"
        )
        summary = trainer.run()
        trainer.say(
            f"done: {summary['steps']} steps, val loss {summary['val_loss']:.4f}, "
            f"{summary['tokens_per_s']:,.0f} tokens/s, {summary['seconds']:.0f} s -> {config.train.out_dir}"
        )
        return 0

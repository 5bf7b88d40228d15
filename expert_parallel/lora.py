"""LoRA on the experts: low-rank adapters on a frozen MoE model, under expert parallelism, in PEFT's format.

    from expert_parallel import lora
    lora.add_lora(model, lora.LoraConfig(r=8, alpha=16, targets=("experts", "attention")))
    ...                                          # train: only the adapters require grad
    lora.save_adapter(model, "out/adapter")      # every rank of the experts' group calls it
    lora.load_adapter(model, "out/adapter")      # on a base model, any layout
    lora.merge_lora(model)                       # fold the adapters into the base weights

The math is PEFT's LoRA: a weight W [in, out] is applied as W + s * A @ B, with
A [in, r], B [r, out] and s = alpha / r. A starts from nn.Linear's bound
U(±1/sqrt(in)), and B starts at zero, so the adapted model starts equal to its base.

Routed experts (`ExpertLoRA`, held as `Experts.lora`): one adapter per fused
weight of a transformers MoE block, as PEFT's `target_parameters` puts one on a
fused 3D parameter:
- into the hidden layer: A [e, D, r] and B [e, r, n*H] for w1 and w3 together
  (n = 2 when gated: w1 and w3 share A, as gate_up_proj's halves do);
- out of it: A [e, H, r] and B [e, r, O] for w2.
Each rank holds its local experts' adapters. They sit inside `Experts`, so the
trainer sums their gradients where the experts' are summed (over dp, not ep:
parallel.expert_parameters). Each logical expert draws its A from its own seed
(seed, MoE layer, logical expert), so every layout starts with the adapters of
the one-process model.

Attention (`LoraLinear`): every nn.Linear inside an attention module (a module
whose class name ends in "Attention"), as PEFT's lora.Linear with its names
(base_layer, lora_A, lora_B).

The file format: `save_adapter` writes adapter_model.safetensors and
adapter_config.json.
- For a transformers model (`hf.from_pretrained`), it writes PEFT's format:
  the experts' adapters gathered over the ranks in global expert order as
  `gate_up_proj` and `down_proj` adapters (`target_parameters`), and the attention
  adapters as `target_modules`. `peft.PeftModel.from_pretrained(model, dir)` loads
  them into the transformers model.
- For our Transformer, the same tensors are written under the model's own names,
  with "format": "expert_parallel" in the config.

Legend: E experts, e local experts, D d_model, H expert hidden width, O d_out, r rank.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import check_int, check_real, from_section
from .experts import Experts, uniform_
from .hf.blocks import all_gather_experts
from .layer import MoELayer
from .materialize import derive_seed
from .tensorfile import load_file, save_file, write_whole

TARGETS = ("experts", "attention")
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's prefix of every saved key (PeftModel wraps model.model)


@dataclass(frozen=True)
class LoraConfig:
    """r: the adapters' rank; alpha: their scale is alpha / r (PEFT's lora_alpha, no rsLoRA).
    targets: of TARGETS ("experts": the routed experts of every MoE layer; "attention": every
    nn.Linear of the attention modules). seed: of A's draws (B starts at zero)."""

    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("experts",)
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("lora", "r", self.r, minimum=1)
        check_real("lora", "alpha", self.alpha)
        check_int("lora", "seed", self.seed, minimum=0)
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = [t for t in self.targets if t not in TARGETS]
        if not self.targets or unknown or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"lora.targets must be distinct names of {TARGETS}, got {list(self.targets)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @classmethod
    def from_section(cls, values: dict) -> LoraConfig:
        """From a TOML [lora] section (targets a list), naming lora.key in every error."""
        values = dict(values)
        targets = values.pop("targets", cls.targets)
        if not isinstance(targets, list | tuple):
            raise ValueError(f"lora.targets must be a list of {TARGETS}, got {targets!r}")
        return replace(from_section(cls, "lora", values), targets=tuple(targets))


class ExpertLoRA(nn.Module):
    """The adapters of e experts: in_a [e, D, r] and in_b [e, r, n*H] on (w1, w3), out_a [e, H, r]
    and out_b [e, r, O] on w2. `adapt` returns the experts' weights with the adapters added."""

    def __init__(self, experts: Experts, r: int, scaling: float):
        super().__init__()
        e, d, h = experts.w1.shape
        n = 1 if experts.w3 is None else 2
        like = dict(dtype=experts.w1.dtype, device=experts.w1.device)
        self.scaling = scaling
        self.in_a = nn.Parameter(torch.zeros(e, d, r, **like))
        self.in_b = nn.Parameter(torch.zeros(e, r, n * h, **like))
        self.out_a = nn.Parameter(torch.zeros(e, h, r, **like))
        self.out_b = nn.Parameter(torch.zeros(e, r, experts.w2.shape[2], **like))

    @torch.no_grad()
    def reset_parameters(self, logical_ids: list[int], seed: int, layer_index: int) -> None:
        """A from nn.Linear's bound, U(±1/sqrt(in)), seeded by (seed, layer, logical expert); B zero."""
        for local_id, logical_id in enumerate(logical_ids):
            name = f"lora.moe{layer_index}.expert{logical_id}"
            generator = torch.Generator().manual_seed(derive_seed(seed, name))
            uniform_(self.in_a, 1 / math.sqrt(self.in_a.shape[1]), generator, index=local_id)
            uniform_(self.out_a, 1 / math.sqrt(self.out_a.shape[1]), generator, index=local_id)
        self.in_b.zero_()
        self.out_b.zero_()

    def deltas(self) -> tuple[Tensor, Tensor]:
        """(scaling * in_a @ in_b [e, D, n*H], scaling * out_a @ out_b [e, H, O])."""
        delta_in_eDN = torch.bmm(self.in_a, self.in_b) * self.scaling
        return delta_in_eDN, torch.bmm(self.out_a, self.out_b) * self.scaling

    def adapt(self, w1, b1, w3, b3, w2, b2) -> tuple[Tensor | None, ...]:
        delta_in_eDN, delta_out_eHO = self.deltas()
        h = w1.shape[2]
        w1 = w1 + delta_in_eDN[..., :h].to(w1.dtype)
        if w3 is not None:
            w3 = w3 + delta_in_eDN[..., h:].to(w3.dtype)
        return w1, b1, w3, b3, w2 + delta_out_eHO.to(w2.dtype), b2

    def extra_repr(self) -> str:
        return f"r={self.in_a.shape[2]}, scaling={self.scaling}"


class LoraLinear(nn.Module):
    """An nn.Linear with an adapter: base_layer(x) + scaling * lora_B(lora_A(x)), PEFT's lora.Linear."""

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, generator: torch.Generator):
        super().__init__()
        like = dict(dtype=base_layer.weight.dtype, device=base_layer.weight.device)
        self.base_layer = base_layer
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **like)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **like)
        self.scaling = scaling
        with torch.no_grad():
            uniform_(self.lora_A.weight, 1 / math.sqrt(base_layer.in_features), generator)
            self.lora_B.weight.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with the adapter folded into its weight."""
        delta_OI = self.lora_B.weight @ self.lora_A.weight * self.scaling
        self.base_layer.weight.add_(delta_OI.to(self.base_layer.weight.dtype))
        return self.base_layer


def add_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Freeze `model` and add adapters to its `config.targets`; returns the adapted modules' names.

    Call it on the model as it will run: after `shard_experts` or
    `hf.from_pretrained` over the group, so each rank adds only its own experts'
    adapters. Refused: a model that already has adapters, one under FSDP, one
    with redundant experts (apply_placement(None) first), and targets matching nothing.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"add_lora: config must be a LoraConfig, got {type(config).__name__}")
    if adapters(model):
        raise ValueError("add_lora: the model already has LoRA adapters (merge_lora or load a fresh model)")
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise ValueError("add_lora: the model is sharded by FSDP; add the adapters before FSDP is applied")
    model.requires_grad_(False)
    adapted: dict[str, list[str]] = {target: [] for target in config.targets}
    if "experts" in config.targets:
        for index, (name, layer) in enumerate(_moe_layers(model)):
            if layer.placement is not None:
                raise ValueError(
                    f"add_lora: {name or 'the layer'} holds redundant experts; apply_placement(None) first"
                )
            layer.experts.lora = ExpertLoRA(layer.experts, config.r, config.scaling)
            layer.experts.lora.reset_parameters(list(layer.local_expert_ids), config.seed, index)
            adapted["experts"].append(_join(name, "experts"))
    if "attention" in config.targets:
        for name, module in list(model.named_modules()):
            if not type(module).__name__.endswith("Attention"):
                continue
            for child, linear in list(module.named_children()):
                if type(linear) is nn.Linear:
                    full = _join(name, child)
                    generator = torch.Generator().manual_seed(derive_seed(config.seed, f"lora.{full}"))
                    setattr(module, child, LoraLinear(linear, config.r, config.scaling, generator))
                    adapted["attention"].append(full)
    for target, names in adapted.items():
        if not names:
            raise ValueError(f"add_lora: lora.targets {target!r} matched nothing in {type(model).__name__}")
    return [name for names in adapted.values() for name in names]


def adapters(model: nn.Module) -> dict[str, nn.Module]:
    """{name: ExpertLoRA or LoraLinear} of every adapter in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertLoRA | LoraLinear)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and remove it; returns `model`.

    Afterwards the model has its base's modules and names again (hf.save_pretrained
    writes it as the original checkpoint); its parameters stay frozen.
    """
    for _, layer in _moe_layers(model):
        experts = layer.experts
        if experts.lora is None:
            continue
        w1, _, w3, _, w2, _ = experts.lora.adapt(experts.w1, None, experts.w3, None, experts.w2, None)
        for param, value in ((experts.w1, w1), (experts.w3, w3), (experts.w2, w2)):
            if param is not None:
                param.copy_(value)
        experts.lora = None
    for module in list(model.modules()):
        for child, wrapped in list(module.named_children()):
            if isinstance(wrapped, LoraLinear):
                setattr(module, child, wrapped.merged())
    return model


def save_adapter(model: nn.Module, path: str | Path, config: LoraConfig) -> Path:
    """Write the adapters to `path` (adapter_model.safetensors, adapter_config.json); returns `path`.

    Every rank of the experts' group calls it: the experts' adapters are gathered one
    tensor at a time in global expert order, and the group's rank 0 writes (with dp
    replicas, each replica's rank 0 writes the same bytes, each file whole, then renamed
    into place: tensorfile.write_whole). A transformers
    model's file is PEFT's (the module doc); our Transformer's has its own names.
    """
    path = Path(path)
    layers = _moe_layers(model)
    group = layers[0][1].group if layers else None
    writer = group is None or dist.get_rank(group) == 0
    peft = _is_transformers(model)
    tensors: dict[str, Tensor] = {}
    target_parameters, target_modules = set(), []
    for name, layer in layers:
        lora = layer.experts.lora
        if lora is None:
            continue
        if layer.placement is not None:
            raise ValueError(f"save_adapter: {name} holds redundant experts; apply_placement(None) first")
        gathered = {
            key: all_gather_experts(t, group) if group is not None else t.detach()
            for key, t in (
                ("in_a", lora.in_a),
                ("in_b", lora.in_b),
                ("out_a", lora.out_a),
                ("out_b", lora.out_b),
            )
        }
        if not peft:
            tensors.update({_join(name, "experts.lora", key): t for key, t in gathered.items()})
            continue
        block = name.removesuffix(".layer")  # the HFMoEBlock, in the transformers block's place
        experts = f"{PEFT_PREFIX}{block}.experts"
        block_format = model.get_submodule(block).format
        in_b = gathered["in_b"]
        if layer.experts.w3 is not None:  # [gate | up] columns in the block's order
            in_b = block_format.layout.join_pair(*in_b.split(in_b.shape[2] // 2, dim=2))
        for key, a_EIr, b_ErJ in _peft_keys(
            experts, (gathered["in_a"], in_b), (gathered["out_a"], gathered["out_b"])
        ):
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = _to_peft(
                a_EIr, b_ErJ, _peft_reads_swapped(block_format)
            )
        leaf = block.rpartition(".")[2]  # mlp, feed_forward, block_sparse_moe
        target_parameters.update({f"{leaf}.experts.gate_up_proj", f"{leaf}.experts.down_proj"})
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            prefix = PEFT_PREFIX + name if peft else name
            tensors[f"{prefix}.lora_A.weight"] = module.lora_A.weight.detach()
            tensors[f"{prefix}.lora_B.weight"] = module.lora_B.weight.detach()
            target_modules.append(name)
    if writer:
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, path / WEIGHTS_FILE, metadata={"format": "pt"}
        )
        if peft:
            record = {
                "peft_type": "LORA",
                "task_type": None,
                "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
                "r": config.r,
                "lora_alpha": config.alpha,
                "lora_dropout": 0.0,
                "bias": "none",
                "fan_in_fan_out": False,
                "use_rslora": False,
                "init_lora_weights": True,
                "inference_mode": True,
                "target_modules": sorted(target_modules),
                "target_parameters": sorted(target_parameters) or None,
            }
        else:
            record = {
                "format": "expert_parallel",
                "r": config.r,
                "lora_alpha": config.alpha,
                "targets": list(config.targets),
                "seed": config.seed,
            }
        write_whole(path / CONFIG_FILE, [(json.dumps(record, indent=2) + "\n").encode()])
    if group is not None:
        dist.barrier(group)
    return path


def read_config(path: str | Path) -> LoraConfig:
    """The LoraConfig of an adapter directory written by save_adapter (or by PEFT, for its
    targets: both expert weights of every MoE block, and linear layers of attention)."""
    record = json.loads((Path(path) / CONFIG_FILE).read_text())
    if record.get("format") == "expert_parallel":
        targets = tuple(record["targets"])
        seed = record.get("seed", 0)
        return LoraConfig(r=record["r"], alpha=record["lora_alpha"], targets=targets, seed=seed)
    if record.get("peft_type") != "LORA":
        raise ValueError(f"{path}: not a LoRA adapter (peft_type {record.get('peft_type')!r})")
    for key, wanted in (
        ("use_rslora", False),
        ("bias", "none"),
        ("fan_in_fan_out", False),
        ("use_dora", False),
    ):
        if record.get(key, wanted) != wanted:
            raise ValueError(f"{path}: {key} = {record[key]!r} is not supported (only plain LoRA)")
    if record.get("rank_pattern") or record.get("alpha_pattern"):
        raise ValueError(f"{path}: rank_pattern and alpha_pattern are not supported")
    targets = []
    if record.get("target_parameters"):
        names = {p.rpartition(".")[2] for p in record["target_parameters"]}
        if names != {"gate_up_proj", "down_proj"}:
            raise ValueError(
                f"{path}: target_parameters {record['target_parameters']}: only both expert weights"
            )
        targets.append("experts")
    if record.get("target_modules"):
        targets.append("attention")
    return LoraConfig(r=record["r"], alpha=record["lora_alpha"], targets=tuple(targets))


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | Path) -> LoraConfig:
    """Add the adapters of `path` (save_adapter's, or PEFT's for the same targets) to `model`,
    each rank its own experts' slice; returns their LoraConfig. Every tensor of the file must
    be used and every adapter filled: else ValueError naming the tensor."""
    path = Path(path)
    config = read_config(path)
    add_lora(model, config)
    tensors = load_file(path / WEIGHTS_FILE)
    peft = _is_transformers(model)
    used = set()

    def take(key: str, shape: tuple[int, ...]) -> Tensor:
        if key not in tensors:
            raise ValueError(f"{path}: {key} is missing")
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
        used.add(key)
        return tensors[key]

    for name, layer in _moe_layers(model):
        lora = layer.experts.lora
        if lora is None:
            continue
        mine = slice(layer.first_expert, layer.first_expert + layer.num_local_experts)
        E = layer.config.num_experts
        if not peft:
            for key in ("in_a", "in_b", "out_a", "out_b"):
                param = getattr(lora, key)
                param.copy_(take(_join(name, "experts.lora", key), (E, *param.shape[1:]))[mine])
            continue
        block = name.removesuffix(".layer")
        experts = f"{PEFT_PREFIX}{block}.experts"
        block_format = model.get_submodule(block).format
        swapped = _peft_reads_swapped(block_format)
        for key, a, b in _peft_keys(experts, (lora.in_a, lora.in_b), (lora.out_a, lora.out_b)):
            (_, i, r), j = a.shape, b.shape[2]
            shape_a, shape_b = ((E * r, j), (i, r * E)) if swapped else ((E * r, i), (j, r * E))
            a_EIr, b_ErJ = _from_peft(
                take(f"{key}.lora_A.weight", shape_a), take(f"{key}.lora_B.weight", shape_b), E, swapped
            )
            if b is lora.in_b and layer.experts.w3 is not None:
                b_ErJ = torch.cat(block_format.layout.split_pair(b_ErJ), dim=2)
            a.copy_(a_EIr[mine])
            b.copy_(b_ErJ[mine])
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            prefix = PEFT_PREFIX + name if peft else name
            module.lora_A.weight.copy_(take(f"{prefix}.lora_A.weight", tuple(module.lora_A.weight.shape)))
            module.lora_B.weight.copy_(take(f"{prefix}.lora_B.weight", tuple(module.lora_B.weight.shape)))
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{path}: {len(unused)} tensors match no adapter of the model, e.g. {unused[0]}")
    return config


def _peft_keys(experts: str, gate_up: tuple, down: tuple) -> list[tuple]:
    """(key, A, B) of the two fused parameters of a transformers experts module under PEFT.

    NOTE: PEFT nests one wrapper per targeted parameter of a module, in the
    module's parameter order: gate_up_proj (registered first) is the inner one,
    under base_layer.
    """
    return [(f"{experts}.base_layer", *gate_up), (experts, *down)]


def _peft_reads_swapped(block_format) -> bool:
    """PEFT takes a fused [E, X, Y] parameter as [E, out, in] unless its module says `is_transposed`.
    Llama 4's experts are stored [E, in, out] without saying so: PEFT's A then multiplies the
    output side. The delta is the same rank-r product, so we write our A as its B and our B
    as its A."""
    return block_format.layout.transposed and not block_format.experts_say_transposed


def _to_peft(a_EIr: Tensor, b_ErJ: Tensor, swapped: bool) -> tuple[Tensor, Tensor]:
    """PEFT's lora_A.weight [E*r, I] (expert-major) and lora_B.weight [J, r*E] (expert-minor:
    column k*E + g is rank k of expert g) of a fused 3D parameter, from A [E, I, r], B [E, r, J]
    (`swapped`: A's and B's places exchanged, see _peft_reads_swapped)."""
    if swapped:
        a_EIr, b_ErJ = b_ErJ.transpose(1, 2), a_EIr.transpose(1, 2)
    E, i, r = a_EIr.shape
    return a_EIr.transpose(1, 2).reshape(E * r, i), b_ErJ.permute(2, 1, 0).reshape(b_ErJ.shape[2], r * E)


def _from_peft(a_Xi: Tensor, b_JX: Tensor, num_experts: int, swapped: bool) -> tuple[Tensor, Tensor]:
    """_to_peft's inverse: A [E, I, r], B [E, r, J] of lora_A.weight and lora_B.weight."""
    E, r = num_experts, a_Xi.shape[0] // num_experts
    a_EIr = a_Xi.reshape(E, r, a_Xi.shape[1]).transpose(1, 2)
    b_ErJ = b_JX.reshape(b_JX.shape[0], r, E).permute(2, 1, 0)
    return (b_ErJ.transpose(1, 2), a_EIr.transpose(1, 2)) if swapped else (a_EIr, b_ErJ)


def _moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def _join(*names: str) -> str:
    return ".".join(name for name in names if name)


def _is_transformers(model: nn.Module) -> bool:
    """A transformers model (hf.from_pretrained's): its adapters are written in PEFT's format."""
    return getattr(getattr(model, "config", None), "model_type", None) is not None

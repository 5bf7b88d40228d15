"""A Hugging Face MoE checkpoint loaded by shard (only the dense tensors and this rank's experts), and saved.

`from_pretrained(path, group)` (exported as `expert_parallel.hf.from_pretrained`):

1. reads the directory's `config.json` (no code from the directory runs unless
   `trust_remote_code=True`) and builds the transformers model of the
   checkpoint's own class with every parameter on the meta device (buffers,
   such as rotary frequencies, are computed as usual);
2. swaps every MoE block (a module with a `gate` or `router` and `experts`)
   for an `MoELayer` over `group` holding this rank's experts (`HFMoEBlock`);
3. reads the `*.safetensors` files (through the index where there is one) one
   tensor at a time: each dense tensor whole, and of the experts only this
   rank's, as slices of a fused `[E, ...]` tensor or as the per-expert tensors
   of the experts it holds. Checkpoint keys are mapped to the model's with
   transformers' own conversion rules (Mixtral's `block_sparse_moe.experts.3.w1`
   is the gate half of expert 3 of `mlp.experts.gate_up_proj`).

What is read of a block, as `hf.from_hf_block` reads it: the router's `weight`
(and `bias`: GPT-OSS), its selection-only bias where the block keeps one
(`gate.e_score_correction_bias`: DeepSeek-V3's family; the block's own
`e_score_correction_bias`: MiniMax-M2; `gate.moe_statics.e_score_correction_bias`
`[1, E]`: ERNIE-4.5-MoE), the experts' fused `gate_up_proj` and `down_proj` in
their layout (`FusedLayout`: transposed for Llama 4 and GPT-OSS, interleaved
for GPT-OSS) with `gate_up_proj_bias` and `down_proj_bias` where they have
biases, and the shared experts (`shared_expert`, `shared_experts`, with
`shared_expert_gate`).

`save_pretrained(model, path)` writes such a model back in its own format
(the conversion rules run backwards, each block's tensors in its own layout,
shapes and dtypes), gathering experts one tensor at a time.

Every parameter must come from the checkpoint, and every checkpoint tensor
must be used (one the layer would not compute, such as a router correction
bias kept where this loader does not look, is refused, never dropped): a
missing or unused tensor, a shape that disagrees with the config, or a
missing or truncated file raises ValueError naming the file and the tensor. The routing math of each block is
checked as `from_hf_block` checks it (the block's router on random tokens).

Legend: E experts, e local experts, D hidden size, I expert hidden width.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import ExecutionConfig
from ..layer import MoELayer
from .blocks import (
    FusedLayout,
    all_gather_experts,
    check_routing,
    config_from_block,
    fused_layout,
    router_linear_name,
    router_name,
    router_of,
    selection_bias_name,
    shared_attribute,
    shared_mlp,
    split_overrides,
    tensor_at,
)

_EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")


@dataclass(frozen=True)
class BlockFormat:
    """How a replaced transformers block held its tensors, for save_pretrained to write them back
    under the same keys, shapes and dtypes, and what its decoder layer takes back from it.

    router: the module holding the router's weight (and bias), relative to the block:
        "gate", "router" (GPT-OSS, Llama 4, Granite-MoE) or "gate.wg" (Hunyuan-MoE).
    selection_bias: the selection bias's name relative to the block (None: none), its
        shape ([E], or ERNIE-4.5's [1, E]) and dtype.
    layout: of the fused experts.
    shared: (attribute, (gate, up, down) projection names) of the shared experts, or None.
    returns_pair: the block's forward returns (hidden_states, router output), which its
        decoder layer unpacks (GPT-OSS, Llama 4).
    experts_say_transposed: the block's experts module declares its layout transposed
        (`is_transposed`), which is how PEFT reads its fused parameters' in and out features
        (GPT-OSS; not Llama 4, whose experts are transposed without saying so: lora.py).
    """

    router: str
    selection_bias: tuple[str, tuple[int, ...], torch.dtype] | None
    layout: FusedLayout
    shared: tuple[str, tuple[str, str, str]] | None
    returns_pair: bool
    experts_say_transposed: bool = False


class HFMoEBlock(nn.Module):
    """An MoELayer in a transformers model's place of an MoE block: hidden_states -> hidden_states
    (or, where the replaced block returned a pair, (hidden_states, None): see BlockFormat).

    transformers' decoder layer takes the block's output tensor only, so the
    layer's aux loss and statistics of the last forward are not returned to it;
    call `self.layer` directly for the whole MoEOutput.
    """

    def __init__(self, layer: MoELayer, block_format: BlockFormat):
        super().__init__()
        self.layer = layer
        self.format = block_format

    def forward(self, hidden_states: Tensor) -> Tensor | tuple[Tensor, None]:
        out = self.layer(hidden_states).out
        return (out, None) if self.format.returns_pair else out


def from_pretrained(
    path: str | Path,
    group=None,
    *,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    stats_group=None,
    execution: ExecutionConfig | None = None,
    **overrides,
) -> nn.Module:
    """The checkpoint's transformers model with every MoE block an MoELayer holding this rank's experts.

    `group`: the ranks the experts are sharded over (None: all experts here).
    `stats_group`: the ranks whose routing statistics the layers sum, for the
    "global_batch" aux loss and selection-bias updates: every rank that sees
    other tokens (the world under dp x ep; MoELayer's `stats_group`).
    `dtype`: of the parameters (default: the config's `dtype`, else float32).
    `execution`: how the layers run (default ExecutionConfig()).
    `overrides`: MoEConfig fields (capacity_factor, aux_loss_coef, aux_loss_scope, ...),
    and ExecutionConfig fields (dispatch, ...) that replace `execution`'s, as for `from_hf_block`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: no config.json; not a Hugging Face model directory")
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    dtype = dtype or _config_dtype(hf_config)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=trust_remote_code)
    reader = _Checkpoint(path, model)
    execution, moe_overrides = split_overrides(overrides, execution)
    blocks = [(name, m) for name, m in model.named_modules() if _is_moe_block(m)]
    if not blocks:
        raise ValueError(
            f"{path}: {type(model).__name__} has no MoE block (a module with `gate` or `router`, and "
            f"`experts`)"
        )
    for name, block in blocks:
        try:
            config = config_from_block(block, moe_overrides)
            block_format = _block_format(block)
        except ValueError as err:
            raise ValueError(f"{path}: the MoE block at {name}: {err}") from err
        with torch.device("meta"), torch.random.fork_rng(devices=[]):
            layer = MoELayer(config, group, stats_group, execution=execution, name=name)
        layer.to(dtype)  # on meta, so that no fp32 copy is ever allocated; the selection bias stays fp32
        layer.to_empty(device="cpu")
        reader.load_layer(name, layer, block_format)
        _check_router_tensors(name, block, layer)
        _materialize(router_of(block))
        reader.load_into(f"{name}.{router_name(block)}", router_of(block))
        try:
            check_routing(block, layer)
        except TypeError as err:  # a router whose forward takes more than the hidden states
            raise ValueError(
                f"{type(block).__name__} at {name}: its router cannot be checked ({err})"
            ) from err
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, HFMoEBlock(layer, block_format))
    _materialize(model)
    reader.load_dense(model)
    reader.check_all_used()
    if (path / "generation_config.json").is_file():  # as transformers' from_pretrained: not the config's
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()
    return model


def _check_router_tensors(name: str, block: nn.Module, layer: MoELayer) -> None:
    """Refuse a router holding a tensor the layer has no place for."""
    prefix = f"{router_name(block)}."
    linear = router_linear_name(block).removeprefix(router_name(block)).removeprefix(".")
    known = {f"{linear}.weight".lstrip(".")}
    known |= {f"{linear}.bias".lstrip(".")} if layer.router.bias is not None else set()
    bias = selection_bias_name(block)
    if layer.selection_bias is not None and bias.startswith(prefix):
        known.add(bias.removeprefix(prefix))
    other = sorted(set(router_of(block).state_dict(keep_vars=True)) - known)
    if other:
        raise ValueError(
            f"{type(block).__name__} at {name}: its router holds {other}, which the MoE layer does not "
            f"compute; this family is not supported"
        )


@contextmanager
def _parameters_on_meta():
    """Every nn.Parameter registered inside is moved to the meta device; buffers stay real.

    NOTE: torch.device("meta") would also put the rotary frequencies (computed
    buffers, not in the checkpoint) on meta. A parameter is created on the CPU
    first: `torch.empty` maps memory without touching it, so no page is resident.
    """
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _materialize(module: nn.Module) -> None:
    """Give every meta parameter under `module` storage on the CPU, keeping tied parameters tied."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    params: dict[int, nn.Parameter] = {}
    for owner in module.modules():
        for name, param in owner._parameters.items():
            if param is not None and param.is_meta:
                places.setdefault(id(param), []).append((owner, name))
                params[id(param)] = param
    for pid, where in places.items():
        old = params[pid]
        new = nn.Parameter(torch.empty(old.shape, dtype=old.dtype), requires_grad=old.requires_grad)
        for owner, name in where:
            owner._parameters[name] = new


def _block_format(block: nn.Module) -> BlockFormat:
    where = type(block).__name__
    if not hasattr(block.experts, "gate_up_proj"):
        raise ValueError(
            f"{where}: from_pretrained reads fused experts (gate_up_proj), as transformers 5 has"
        )
    bias = selection_bias_name(block)
    if bias is not None:
        tensor = tensor_at(block, bias)
        bias = (bias, tuple(tensor.shape), tensor.dtype)
    return BlockFormat(
        router=router_linear_name(block),
        selection_bias=bias,
        layout=fused_layout(block.experts, where),
        shared=_shared_names(block),
        returns_pair=_returns_pair(block),
        experts_say_transposed=bool(getattr(block.experts, "is_transposed", False)),
    )


def _shared_names(block: nn.Module) -> tuple[str, tuple[str, str, str]] | None:
    """(attribute, (gate, up, down) projection names) of a block's shared experts; None without them."""
    shared = shared_mlp(block)
    if shared is None:
        return None
    names = ("gate_proj", "up_proj", "down_proj") if hasattr(shared, "gate_proj") else ("w1", "w3", "w2")
    return shared_attribute(block), names


def _returns_pair(block: nn.Module) -> bool:
    """Whether every `return` of the block's forward returns two values (GPT-OSS and Llama 4 return
    (hidden_states, router output), which their decoder layers unpack).

    NOTE: read from the forward's source: nothing else on a block says so, and a
    pair where a tensor is expected, or the reverse, would be unpacked along the
    batch dimension. No source (compiled, generated code): a tensor.
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(block).forward)))
    except (OSError, TypeError, SyntaxError):
        return False
    (function,) = tree.body
    returns, pending = [], list(function.body)
    while pending:  # the forward's own statements, not those of functions defined inside it
        node = pending.pop()
        if isinstance(node, ast.Return):
            returns.append(node.value)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            pending.extend(ast.iter_child_nodes(node))
    return bool(returns) and all(isinstance(v, ast.Tuple) and len(v.elts) == 2 for v in returns)


def _is_moe_block(module: nn.Module) -> bool:
    experts = getattr(module, "experts", None)
    has_router = any(getattr(module, n, None) is not None for n in ("gate", "router"))
    return has_router and (hasattr(experts, "gate_up_proj") or isinstance(experts, nn.ModuleList))


def _config_dtype(hf_config) -> torch.dtype:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


class _Checkpoint:
    """The directory's safetensors files, keyed by the model's names (transformers' conversion rules)."""

    def __init__(self, path: Path, model: nn.Module):
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        except ImportError as err:  # transformers 4.x: no conversion rules to read
            raise ImportError("expert_parallel.hf.from_pretrained needs transformers >= 5.0") from err

        self.path = path
        files = self._files()
        conversions = get_model_conversion_mapping(model)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        self.keys: dict[str, tuple[str, Path]] = {}  # model name -> (checkpoint key, file), dense
        # fused expert parameter (model name) -> {(expert or None, part): (checkpoint key, file)}
        self.expert_keys: dict[str, dict[tuple[int | None, int], tuple[str, Path]]] = {}
        for key, file in files.items():
            target, pattern = rename_source_key(key, renamings, converters)
            if pattern is None:
                self.keys[target] = (key, file)
                continue
            converter = next(c for c in converters if pattern in c.source_patterns)
            part = converter.source_patterns.index(pattern)  # gate_up_proj: 0 the gate, 1 the up half
            expert = _EXPERT_INDEX.search(key)
            slot = (int(expert.group(1)) if expert else None, part)
            self.expert_keys.setdefault(target, {})[slot] = (key, file)
        self.used: set[str] = set()  # checkpoint keys read, or left to other ranks (their experts)

    def check_all_used(self) -> None:
        """Raise if the checkpoint holds a tensor the model did not take: something it does not compute."""
        every = {key for key, _ in self.keys.values()}
        every |= {key for slots in self.expert_keys.values() for key, _ in slots.values()}
        unused = sorted(every - self.used)
        if unused:
            raise ValueError(
                f"{self.path}: the checkpoint holds {len(unused)} tensor(s) the model does not use "
                f"({', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''}): a feature of this model "
                f"that the MoE layer does not compute, or a checkpoint of another architecture"
            )

    def _files(self) -> dict[str, Path]:
        """Checkpoint key -> the file holding it, from the index or the single file."""
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise ValueError(f"{index}: not a safetensors index ({err})") from err
            return {key: self.path / name for key, name in weight_map.items()}
        single = self.path / "model.safetensors"
        if not single.is_file():
            raise ValueError(f"{self.path}: neither model.safetensors nor model.safetensors.index.json")
        return {key: single for key in self._open(single).keys()}

    def _open(self, file: Path):
        from safetensors import safe_open

        if not file.is_file():
            raise ValueError(f"{file}: missing (named by the checkpoint's index)")
        try:
            return safe_open(file, framework="pt")
        except Exception as err:  # safetensors raises its own error types for truncated headers
            raise ValueError(f"{file}: cannot be read as safetensors ({err})") from err

    def read(self, key: str, file: Path, rows: slice | None = None) -> Tensor:
        """One tensor (or rows of its first dimension) from one file.

        NOTE: the file is opened for each tensor, so that its mapping is dropped
        at once: the pages a read touches would otherwise count in this rank's
        RSS until the end of the load, once more the bytes it holds.
        """
        self.used.add(key)
        with self._open(file) as f:
            try:
                if rows is None:
                    return f.get_tensor(key)
                return f.get_slice(key)[rows]
            except Exception as err:
                raise ValueError(f"{file}: cannot read tensor {key!r} ({err})") from err

    def load_into(self, prefix: str, module: nn.Module) -> None:
        """Every parameter and persistent buffer of `module` from the checkpoint key of `prefix.<name>`."""
        for name, tensor in module.state_dict(keep_vars=True).items():
            self._copy(f"{prefix}.{name}", tensor)

    def load_dense(self, model: nn.Module) -> None:
        """Every parameter and persistent buffer outside the MoE layers (loaded before)."""
        persistent = set(model.state_dict(keep_vars=True))
        loaded = {
            id(t)
            for m in model.modules()
            if isinstance(m, HFMoEBlock)
            for t in m.state_dict(keep_vars=True).values()
        }
        # A tied LM head is the embedding's parameter, listed once under the embedding's name.
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if id(tensor) in loaded or name not in persistent:  # the MoE layers; computed buffers (rotary)
                continue
            self._copy(name, tensor)

    @torch.no_grad()
    def _copy(self, name: str, target: Tensor) -> None:
        value = self._read_named(name)
        key, file = self.keys[name]
        if value.shape != target.shape:
            raise ValueError(
                f"{file}: tensor {key!r} has shape {tuple(value.shape)}, the config makes {name!r} "
                f"{tuple(target.shape)}"
            )
        target.copy_(value)

    @torch.no_grad()
    def load_layer(self, name: str, layer: MoELayer, block_format: BlockFormat) -> None:
        """The router, selection bias, this rank's experts and the shared experts of one block."""
        self._copy(f"{name}.{block_format.router}.weight", layer.router.weight)
        if layer.router.bias is not None:
            self._copy(f"{name}.{block_format.router}.bias", layer.router.bias)
        if layer.selection_bias is not None:
            bias, shape, _ = block_format.selection_bias
            self._copy(f"{name}.{bias}", layer.selection_bias.view(shape))
        first, count, layout = layer.first_expert, layer.num_local_experts, block_format.layout
        hidden, d_model, d_out = layer.config.d_hidden, layer.config.d_model, layer.config.d_out
        gate_up, down = f"{name}.experts.gate_up_proj", f"{name}.experts.down_proj"
        gate_up_shape = (d_model, 2 * hidden) if layout.transposed else (2 * hidden, d_model)
        down_shape = (hidden, d_out) if layout.transposed else (d_out, hidden)
        # NOTE: one expert at a time, so that no more than one expert's tensor is ever read but not placed.
        for j, g in enumerate(range(first, first + count)):
            w1_DI, w3_DI = layout.split(self._expert(gate_up, g, parts=2, shape=gate_up_shape))
            layer.experts.w1[j].copy_(w1_DI)
            layer.experts.w3[j].copy_(w3_DI)
            layer.experts.w2[j].copy_(layout.w2(self._expert(down, g, parts=1, shape=down_shape)))
            if layout.bias:
                b1_I, b3_I = layout.split_pair(
                    self._expert(f"{gate_up}_bias", g, parts=1, shape=(2 * hidden,))
                )
                layer.experts.b1[j].copy_(b1_I)
                layer.experts.b3[j].copy_(b3_I)
                layer.experts.b2[j].copy_(self._expert(f"{down}_bias", g, parts=1, shape=(d_out,)))
        if block_format.shared is not None:
            attribute, names = block_format.shared
            prefix = f"{name}.{attribute}"
            for mine, theirs in zip(("w1", "w3", "w2"), names):
                weight = self._read_named(f"{prefix}.{theirs}.weight")
                getattr(layer.shared_experts, mine).copy_(weight.t())
            if layer.shared_experts.gate is not None:
                layer.shared_experts.gate.copy_(self._read_named(f"{name}.shared_expert_gate.weight")[0])

    def _read_named(self, name: str) -> Tensor:
        if name not in self.keys:
            raise ValueError(f"{self.path}: the checkpoint has no tensor for {name!r}")
        return self.read(*self.keys[name])

    def _expert(self, target: str, g: int, parts: int, shape: tuple[int, ...]) -> Tensor:
        """Expert g of the fused expert parameter `target` [E, ...]: a one-row slice of the fused tensor
        on disk, or expert g's per-expert tensors, their parts joined on dim 0."""
        slots = self.expert_keys.get(target) or {}
        self.used.update(key for key, _ in slots.values())  # other ranks read the others' experts
        if not slots and target in self.keys:  # fused on disk too
            key, file = self.keys[target]
            value = self.read(key, file, slice(g, g + 1))[0]
        else:
            missing = [p for p in range(parts) if (g, p) not in slots]
            if not slots or missing:
                raise ValueError(f"{self.path}: the checkpoint has no tensor for expert {g} of {target!r}")
            value = torch.cat([self.read(*slots[(g, p)]) for p in range(parts)], dim=0)
            key, file = slots[(g, 0)]
        if tuple(value.shape) != shape:
            raise ValueError(
                f"{file}: expert {g} of {target!r} ({key!r}) reads as {tuple(value.shape)}, the config makes "
                f"{shape}"
            )
        return value


def save_pretrained(model: nn.Module, path: str | Path) -> Path:
    """Write `model` (from `from_pretrained`) as the checkpoint transformers' save_pretrained would write.

    Every rank of the MoE layers' group calls it. The same tensor names,
    shapes and config as the original directory: transformers' conversion
    rules run backwards, so Mixtral's experts go back to
    `block_sparse_moe.experts.<g>.w1.weight`. Rank 0 writes one file for the
    dense tensors and one per MoE layer, with an index. Experts are gathered
    one tensor at a time, so a rank holds at most one MoE layer's experts
    beyond its own, never the whole model. Returns the directory.
    """
    import torch.distributed as dist
    from safetensors.torch import save_file

    path = Path(path)
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, HFMoEBlock)]
    group = blocks[0][1].layer.group if blocks else None
    rank = dist.get_rank(group) if group is not None else 0
    names = _DiskNames(model)
    files: list[dict[str, Tensor]] = [{}]
    moe_tensors = {id(t) for _, block in blocks for t in block.state_dict(keep_vars=True).values()}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in moe_tensors:
            whole = _whole(tensor)  # collective under FSDP: every rank, in the same order
            if rank == 0:
                files[0][names.dense(name)] = whole
    for name, block in blocks:
        files.append(_block_tensors(name, block, names))  # collective: every rank gathers
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(path)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(path)
        weight_map, total = {}, 0
        for i, tensors in enumerate(files):
            file = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            _drop_tied(model, tensors)
            save_file(tensors, path / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file))
            total += sum(t.nbytes for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if group is not None:
        dist.barrier(group)
    return path


def _drop_tied(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """A tied LM head is not written (transformers saves the embedding only)."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if getattr(model.config, "tie_word_embeddings", False):
        for key in tied:
            tensors.pop(key, None)


class _DiskNames:
    """The model's tensor names -> the checkpoint's, by transformers' conversion rules run backwards."""

    def __init__(self, model: nn.Module):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        conversions = get_model_conversion_mapping(model, add_legacy=False)
        self.renamings = [c.reverse_transform() for c in conversions if isinstance(c, WeightRenaming)]
        self.converters = [c for c in conversions if isinstance(c, WeightConverter)]
        self._rename = rename_source_key

    def dense(self, name: str) -> str:
        return self._rename(name, self.renamings, [], reverse=True)[0]

    def experts(self, name: str, count: int) -> list[list[str]] | None:
        """For a fused expert parameter `name` ([E, ...] in memory), the checkpoint key of each part of
        each expert g ([g][part]); None when the checkpoint keeps it fused too."""
        for converter in self.converters:
            (target,) = converter.target_patterns
            if target in name and all("*" in source for source in converter.source_patterns):
                return [
                    [
                        self.dense(name.replace(target, source.replace("*", str(g))))
                        for source in converter.source_patterns
                    ]
                    for g in range(count)
                ]
        return None


@torch.no_grad()
def _block_tensors(name: str, block: HFMoEBlock, names: _DiskNames) -> dict[str, Tensor]:
    """One MoE block's tensors under the checkpoint's keys; its experts gathered from every rank."""
    layer = block.layer
    if layer.placement is not None:
        raise ValueError(f"save_pretrained: {name} holds redundant experts; apply_placement(None) first")
    block_format = block.format
    tensors = {names.dense(f"{name}.{block_format.router}.weight"): layer.router.weight}
    if layer.router.bias is not None:
        tensors[names.dense(f"{name}.{block_format.router}.bias")] = layer.router.bias
    if layer.selection_bias is not None:
        bias, shape, dtype = block_format.selection_bias
        tensors[names.dense(f"{name}.{bias}")] = layer.selection_bias.view(shape).to(dtype)
    E = layer.config.num_experts

    def gathered(local_eXY: Tensor) -> Tensor:
        local_eXY = _whole(local_eXY)  # this ep rank's experts, from their FSDP shards over dp
        return all_gather_experts(local_eXY, layer.group) if layer.group is not None else local_eXY

    layout, experts = block_format.layout, layer.experts
    fused_tensors = [  # in the block's layout, e.g. gate_up_proj [E, 2I, D]: the gate rows, then the up rows
        (f"{name}.experts.gate_up_proj", layout.join(gathered(experts.w1), gathered(experts.w3))),
        (f"{name}.experts.down_proj", layout.down(gathered(experts.w2))),
    ]
    if layout.bias:
        gate_up_bias_EX = layout.join_pair(gathered(experts.b1), gathered(experts.b3))
        tensors[names.dense(f"{name}.experts.gate_up_proj_bias")] = gate_up_bias_EX
        tensors[names.dense(f"{name}.experts.down_proj_bias")] = gathered(experts.b2)
    hidden = layer.config.d_hidden
    for fused, value in fused_tensors:
        keys = names.experts(fused, E)
        if keys is None:
            tensors[names.dense(fused)] = value
            continue
        for g, parts in enumerate(keys):
            pieces = value[g].split(hidden) if len(parts) == 2 else [value[g]]
            tensors.update(dict(zip(parts, pieces)))
    if block_format.shared is not None:
        attribute, projections = block_format.shared
        for mine, theirs in zip(("w1", "w3", "w2"), projections):
            tensors[names.dense(f"{name}.{attribute}.{theirs}.weight")] = getattr(
                layer.shared_experts, mine
            ).t()
        if layer.shared_experts.gate is not None:
            tensors[names.dense(f"{name}.shared_expert_gate.weight")] = layer.shared_experts.gate.unsqueeze(0)
    return {key: _whole(t) for key, t in tensors.items()}


def _whole(tensor: Tensor) -> Tensor:
    """A detached, contiguous tensor of the full value: an FSDP DTensor gathered from its shards."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().contiguous()

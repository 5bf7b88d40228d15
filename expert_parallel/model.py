"""A small decoder-only byte-level transformer whose feed-forwards may be MoE layers.

Legend: B batch, S sequence (at most seq_len), D d_model, N heads, A head width
D / N, F dense feed-forward hidden width, V vocab, L columns of a KV cache
(earlier ones and this call's S).

The model knows nothing about process groups: every MoE layer is built with
group=None and lives at `blocks[i].ffn`, where expert parallelism can swap it
for a sharded one from outside.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import (
    ACTIVATIONS,
    ExecutionConfig,
    MoEConfig,
    check_bool,
    check_choice,
    check_int,
    check_real,
    from_section,
)
from .experts import NormalInit
from .layer import Inference, MoELayer, MoEOutput, layer_routes, stack_routes
from .materialize import derive_seed, write_held

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swiglu": F.silu}
_INIT_STD = 0.02


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """What the transformer computes.

    vocab_size: V (256 for bytes).     seq_len: the longest sequence, also the
        size of the learned position embedding.
    d_model: D.   n_layers: blocks.   n_heads: N, must divide d_model.
    moe: the MoE feed-forward (None: every block is dense); its d_model and
        d_out must equal d_model.
    moe_every: k; blocks k-1, 2k-1, ... are MoE (1: all of them; 2: blocks 1, 3, ...).
    d_ff_dense: F, hidden width of the dense feed-forwards (None -> 4 * d_model).
    dense_activation: "relu", "gelu", "silu" or "swiglu", as in MoEConfig.
    norm_eps: RMSNorm epsilon.   tie_embeddings: the LM head is the token embedding.

    Attention and dense feed-forward Linears carry no biases, so a dense block of
    width F = top_k * d_hidden has the active weights of an MoE block with
    bias=False, less the router.
    """

    vocab_size: int = 256
    seq_len: int
    d_model: int
    n_layers: int
    n_heads: int
    moe: MoEConfig | None = None
    moe_every: int = 1
    d_ff_dense: int | None = None
    dense_activation: str = "gelu"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "moe_every"):
            check_int("ModelConfig", name, getattr(self, name), minimum=1)
        if self.d_model % self.n_heads:
            raise ValueError(f"ModelConfig.n_heads={self.n_heads} must divide d_model={self.d_model}")
        if self.d_ff_dense is None:
            object.__setattr__(self, "d_ff_dense", 4 * self.d_model)
        check_int("ModelConfig", "d_ff_dense", self.d_ff_dense, minimum=1)
        check_choice("ModelConfig", "dense_activation", self.dense_activation, ACTIVATIONS)
        check_real("ModelConfig", "norm_eps", self.norm_eps)
        if not self.norm_eps > 0:
            raise ValueError(f"ModelConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        check_bool("ModelConfig", "tie_embeddings", self.tie_embeddings)
        if self.moe is None:
            return
        if not isinstance(self.moe, MoEConfig):
            raise ValueError(
                f"ModelConfig.moe must be a MoEConfig or None (ModelConfig.from_dict takes a dict), "
                f"got {type(self.moe).__name__}"
            )
        for name in ("d_model", "d_out"):
            if getattr(self.moe, name) != self.d_model:
                raise ValueError(
                    f"ModelConfig.moe.{name}={getattr(self.moe, name)} must equal "
                    f"ModelConfig.d_model={self.d_model}"
                )
        if self.moe_every > self.n_layers:
            raise ValueError(
                f"ModelConfig.moe_every={self.moe_every} leaves no MoE block among n_layers={self.n_layers}"
            )

    def is_moe_block(self, index: int) -> bool:
        return self.moe is not None and index % self.moe_every == self.moe_every - 1

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["moe"] = None if self.moe is None else self.moe.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        """A config from plain values (a TOML [model] section); `moe` may be a dict (-> MoEConfig)
        whose d_model, when it leaves it out, is the model's."""
        values = dict(values)
        moe = values.pop("moe", None)
        model = from_section(cls, "model", values)
        if isinstance(moe, dict):
            moe = MoEConfig.from_dict({"d_model": model.d_model, **moe})
        return dataclasses.replace(model, moe=moe) if moe is not None else model


class Attention(nn.Module):
    """Causal multi-head self-attention.

    forward(x [B, S, D], past=None, mask_BSL=None) -> (y [B, S, D], (k, v) [B, N, L, A]).
    Without `past` it is causal over the S positions (L = S). With `past`, the
    cached (k, v) of earlier positions, the S new ones follow them (L = past + S)
    and `mask_BSL` [B, S, L] says which keys each query sees.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = _linear(config.d_model, 3 * config.d_model, _INIT_STD)
        self.proj = _linear(config.d_model, config.d_model, _residual_std(config))

    def forward(
        self,
        x_BSD: Tensor,
        past: tuple[Tensor, Tensor] | None = None,
        mask_BSL: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        B, S, D = x_BSD.shape
        N, A = self.n_heads, D // self.n_heads
        q_BSD, k_BSD, v_BSD = self.qkv(x_BSD).split(D, dim=-1)
        q_BNSA, k_BNSA, v_BNSA = (t.view(B, S, N, A).transpose(1, 2) for t in (q_BSD, k_BSD, v_BSD))
        if past is not None:
            k_BNLA, v_BNLA = torch.cat([past[0], k_BNSA], dim=2), torch.cat([past[1], v_BNSA], dim=2)
        else:
            k_BNLA, v_BNLA = k_BNSA, v_BNSA
        if mask_BSL is None:
            y_BNSA = F.scaled_dot_product_attention(q_BNSA, k_BNLA, v_BNLA, is_causal=True)
        else:
            y_BNSA = F.scaled_dot_product_attention(q_BNSA, k_BNLA, v_BNLA, attn_mask=mask_BSL.unsqueeze(1))
        return self.proj(y_BNSA.transpose(1, 2).reshape(B, S, D)), (k_BNLA, v_BNLA)


class DenseFFN(nn.Module):
    """act(x @ w1) @ w2; swiglu: (silu(x @ w1) * (x @ w3)) @ w2, as the MoE experts compute."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, f = config.d_model, config.d_ff_dense
        self.activation = config.dense_activation
        self.w1 = _linear(d, f, _INIT_STD)
        self.w3 = _linear(d, f, _INIT_STD) if self.activation == "swiglu" else None
        self.w2 = _linear(f, d, _residual_std(config))

    def forward(self, x_BSD: Tensor) -> Tensor:
        h_BSF = _ACTIVATIONS[self.activation](self.w1(x_BSD))
        if self.w3 is not None:
            h_BSF = h_BSF * self.w3(x_BSD)
        return self.w2(h_BSF)


class Block(nn.Module):
    """x + attn(norm(x)), then x + ffn(norm(x)); ffn is an MoELayer or a DenseFFN.

    forward(x, choices_before_E=None, past=None, mask_BSL=None, inference=None, routes_TK=None) ->
    (x, MoEOutput of its MoE layer or None when dense, the attention's (k, v));
    the MoEOutput's `out` is detached (x carries its gradient). `past` and
    `mask_BSL` as in Attention; `inference` and `routes_TK` (its `routes`) go
    to the MoE layer.
    """

    def __init__(
        self,
        config: ModelConfig,
        index: int,
        execution: ExecutionConfig | None = None,
        moe_seed: int | None = None,
    ):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        if config.is_moe_block(index):
            self.ffn = MoELayer(
                config.moe, group=None, execution=execution, name=f"blocks.{index}.ffn", init_seed=moe_seed
            )
        else:
            self.ffn = DenseFFN(config)

    def forward(
        self,
        x_BSD: Tensor,
        choices_before_E: Tensor | None = None,
        past: tuple[Tensor, Tensor] | None = None,
        mask_BSL: Tensor | None = None,
        inference: Inference | None = None,
        routes_TK: Tensor | None = None,
    ) -> tuple[Tensor, MoEOutput | None, tuple[Tensor, Tensor]]:
        y_BSD, kv = self.attn(self.attn_norm(x_BSD), past, mask_BSL)
        x_BSD = x_BSD + y_BSD
        if not isinstance(self.ffn, MoELayer):
            return x_BSD + self.ffn(self.ffn_norm(x_BSD)), None, kv
        moe = self.ffn(self.ffn_norm(x_BSD), choices_before_E, inference=inference, routes=routes_TK)
        # NOTE: the returned `out` is detached: the residual sum carries its gradient, and an output
        # view that requires grad would make FSDP2 warn on every forward.
        return x_BSD + moe.out, moe._replace(out=moe.out.detach()), kv


@dataclass(frozen=True, eq=False)
class KVCache:
    """What decoding keeps between calls, held by the caller: each block's attention keys and
    values for every column so far, and which columns are real.

    keys, values: one [B, N, L, A] per block.   valid_BL: [B, L] bool, False at left padding.
    `Transformer.decode` returns a new cache and leaves the one it was given as it was.
    """

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    valid_BL: Tensor

    @property
    def length(self) -> int:
        """L, the columns so far (padding included)."""
        return self.valid_BL.shape[1]


class Transformer(nn.Module):
    """Token and learned position embeddings, n_layers pre-norm blocks, RMSNorm, LM head.

    Initialisation: construction draws one seed, `init_seed`, from torch's
    default CPU generator, so torch.manual_seed(s) before construction gives
    identical models. Each dense tensor is drawn from its own generator seeded
    by (init_seed, its name), each MoE layer from a seed derived the same way
    (its own layout-independent scheme, MoELayer): the values depend on
    neither construction order, device nor layout. Embeddings and Linears ~
    N(0, 0.02), the projections back into the residual stream
    ~ N(0, 0.02 / sqrt(2 * n_layers)) (GPT-2), norms 1. The MoE layers the
    same way (`moe_init`): the router and each expert's w1 (w3) ~ N(0, 0.02),
    its w2 ~ N(0, 0.02 / sqrt(2 * n_layers)), biases 0, as a dense block
    (not MoELayer's own nn.Linear default: docs/configuration.md). Built under
    torch.device("meta"), nothing is written until `reset_parameters()`
    (build.build_model: shard, `to_empty`, then reset).

    `execution`: how the MoE layers run (ExecutionConfig; the defaults if None).
    `activation_checkpointing` (a plain attribute, off by default): in
    training, each block's activations are recomputed in the backward
    (torch.utils.checkpoint, non-reentrant) instead of kept. The MoE layers
    reuse the forward's routing and counts in that recompute (MoELayer).

    Decoding: `decode` runs tokens against a KV cache the caller holds
    (KVCache) and returns the new one; `generate` prefills once, then decodes
    a token at a time, for one prompt or a left-padded batch of them.
    """

    def __init__(self, config: ModelConfig, execution: ExecutionConfig | None = None):
        super().__init__()
        self.config = config
        # NOTE: on the CPU generator, also when built under torch.device("meta").
        self.init_seed = int(torch.randint(0, 2**62, (), device="cpu"))
        # NOTE: storage handed in, so that nn.Embedding skips its own normal_ init: on the meta
        # device that first call imports some 280 modules of meta kernels (about 100 MiB).
        V, S, D = config.vocab_size, config.seq_len, config.d_model
        self.tok_emb = nn.Embedding(V, D, _weight=torch.empty(V, D))
        self.pos_emb = nn.Embedding(S, D, _weight=torch.empty(S, D))
        self.blocks = nn.ModuleList(
            Block(config, i, execution, derive_seed(self.init_seed, f"blocks.{i}.ffn"))
            for i in range(config.n_layers)
        )
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        if config.tie_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
            self.lm_head.weight = self.tok_emb.weight
        else:
            self.lm_head = _linear(config.d_model, config.vocab_size, _INIT_STD)
        self.activation_checkpointing = False
        self._reset_dense()
        self._reset_moe()

    def tie_weights(self) -> None:
        """Make the LM head the token embedding again (with tie_embeddings), after a `to_empty`.

        NOTE: `to_empty` from the meta device makes a new Parameter per module,
        so a tied weight comes back as two.
        """
        if self.config.tie_embeddings and self.lm_head.weight is not self.tok_emb.weight:
            self.lm_head.weight = self.tok_emb.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Write every parameter's initial values (all of them, this rank's shard, or none on meta)."""
        self._reset_dense()
        self._reset_moe()

    def moe_init(self) -> NormalInit:
        """The MoE layers' initial distributions: as the dense blocks' (module doc)."""
        return NormalInit(std=_INIT_STD, out_std=_residual_std(self.config), router_std=_INIT_STD)

    @torch.no_grad()
    def _reset_moe(self) -> None:
        init = self.moe_init()
        for _, layer in self.moe_layers():
            layer.reset_parameters(init=init)

    @torch.no_grad()
    def _reset_dense(self) -> None:
        moe_prefixes = tuple(f"{name}." for name, _ in self.moe_layers())
        for name, param in self.named_parameters():  # a tied weight once, under its first name
            if name.startswith(moe_prefixes) or param.is_meta:
                continue
            owner = self.get_submodule(name.rpartition(".")[0])
            if isinstance(owner, nn.RMSNorm):
                values = torch.ones(param.shape)
            else:
                generator = torch.Generator().manual_seed(derive_seed(self.init_seed, name))
                std = getattr(owner, "init_std", _INIT_STD)
                values = torch.empty(param.shape).normal_(0.0, std, generator=generator)
            write_held(param, values)

    def forward(
        self,
        tokens_BS: Tensor,
        choices_before: list[Tensor | None] | None = None,
        *,
        routes: Tensor | None = None,
    ) -> tuple[Tensor, list[MoEOutput]]:
        """tokens [B, S] (integer ids, S <= seq_len) -> (logits [B, S, V], an MoEOutput per MoE layer).

        choices_before: per MoE layer (in `moe_layers` order), this rank's
        choices per expert in the step's earlier micro-batches, for the
        "global_batch" aux loss (None: the first micro-batch).
        routes: [B, S, L_moe, K] integer logical expert ids to replay, MoE layer l
        (in `moe_layers` order) gets routes[:, :, l] (MoELayer's `routes`; -1
        rows route natively), e.g. what `generate(..., record_routes=True)`
        recorded. `layer.stack_routes(outputs, B)` gives a forward's own.
        """
        if tokens_BS.dim() != 2 or not 1 <= tokens_BS.shape[1] <= self.config.seq_len:
            raise ValueError(
                f"Transformer expects tokens [B, S] with 1 <= S <= seq_len={self.config.seq_len}, "
                f"got {tuple(tokens_BS.shape)}"
            )
        positions_S = torch.arange(tokens_BS.shape[1], device=tokens_BS.device)
        x_BSD = self.tok_emb(tokens_BS) + self.pos_emb(positions_S)
        before = iter(choices_before or [])
        num_moe = sum(isinstance(block.ffn, MoELayer) for block in self.blocks)
        per_layer = iter(layer_routes(routes, tuple(tokens_BS.shape), num_moe, "Transformer.forward"))
        outputs = []
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            is_moe = isinstance(block.ffn, MoELayer)
            choices_E = next(before, None) if is_moe else None
            routes_TK = next(per_layer) if is_moe else None
            if recompute:  # NOTE: the recompute is given the routes too; the layer reuses its decision
                x_BSD, moe, _ = checkpoint(
                    block, x_BSD, choices_E, None, None, None, routes_TK, use_reentrant=False
                )
            else:
                x_BSD, moe, _ = block(x_BSD, choices_E, routes_TK=routes_TK)
            if moe is not None:
                outputs.append(moe)
        return self.lm_head(self.norm(x_BSD)), outputs

    def loss(
        self,
        tokens: Tensor,
        choices_before: list[Tensor | None] | None = None,
        *,
        routes: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, list[MoEOutput]]:
        """tokens [B, S + 1] -> (lm_loss, aux_loss, an MoEOutput per MoE layer).

        lm_loss: mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1].
        aux_loss: sum over the MoE layers of their `aux_loss` for this forward
        (coefficients already applied; a 0.0 tensor without MoE layers).
        choices_before: as in `forward`.
        routes: as in `forward`, [B, S, L_moe, K] for tokens[:, :-1], or [B, S + 1, L_moe, K]
        for all of `tokens` (a recording's; the last position's are not used).
        """
        return next_token_loss(self, tokens, choices_before, routes, "Transformer.loss")

    def moe_layers(self) -> list[tuple[str, MoELayer]]:
        """(name, layer) for every MoE feed-forward, in block order; names are `blocks.{i}.ffn`."""
        return [(f"blocks.{i}.ffn", b.ffn) for i, b in enumerate(self.blocks) if isinstance(b.ffn, MoELayer)]

    def num_params(self, active_only: bool = False) -> int:
        """Parameters of the whole model, a tied embedding counted once.

        MoE experts are counted from the config, so the answer is the same on
        every rank whatever the expert-parallel layout: num_experts experts per
        MoE layer, or top_k of them with active_only (the weights one token
        uses; the router counts in full).
        """
        expert_params = {id(p) for _, layer in self.moe_layers() for p in layer.experts.parameters()}
        count = sum(p.numel() for p in self.parameters() if id(p) not in expert_params)
        for _, layer in self.moe_layers():
            per_expert = sum(p.numel() for p in layer.experts.parameters()) // layer.num_local_experts
            count += per_expert * (layer.config.top_k if active_only else layer.config.num_experts)
        return count

    def decode(
        self,
        tokens_BS: Tensor,
        cache: KVCache | None = None,
        *,
        valid_BS: Tensor | None = None,
        capacity_factor: float | None = None,
        tokens_per_rank: int | None = None,
        record_routes: bool = False,
    ) -> tuple[Tensor, KVCache] | tuple[Tensor, KVCache, Tensor]:
        """tokens [B, S] after those in `cache` (None: no earlier ones) -> (logits [B, S, V], the
        cache with them). Prefill is a decode of the prompt without a cache; each later call
        runs the new tokens (one per row) against the cache.

        valid_BS: [B, S] bool, False where a row is (left) padding (None: all real). No query
            attends to padding and padding takes no position: a row's real tokens sit at
            positions 0, 1, ... as in the forward of that row alone. (A padding query sees
            itself only, so that no NaN row reaches the MoE layers.)
        capacity_factor: the MoE layers' for this call (None: dropless; see layer.Inference).
        tokens_per_rank: a bound on B * S on every rank of an expert-parallel group, the
            same value on all of them; with it an eval forward without gradients may use the
            fixed dispatch (dispatchers.for_call). Generation passes its batch bound for the
            one-token steps.
        record_routes: also return the MoE layers' expert ids of these tokens, [B, S, L_moe, K]
            long (`layer.stack_routes`): (logits, cache, routes).
        The cache holds at most seq_len columns, padding included (the position embedding's size).
        """
        if tokens_BS.dim() != 2 or tokens_BS.shape[1] == 0:
            raise ValueError(f"decode expects tokens [B, S] with S >= 1, got {tuple(tokens_BS.shape)}")
        B, S = tokens_BS.shape
        past = 0 if cache is None else cache.length
        if past + S > self.config.seq_len:
            raise ValueError(
                f"decode: {past} cached columns and {S} new ones exceed seq_len={self.config.seq_len}"
            )
        device = tokens_BS.device
        if valid_BS is None:
            valid_BS = torch.ones(B, S, dtype=torch.bool, device=device)
        past_valid_BL = (
            torch.zeros(B, 0, dtype=torch.bool, device=device) if cache is None else cache.valid_BL
        )
        if valid_BS.shape != (B, S) or past_valid_BL.shape[0] != B:
            raise ValueError(
                f"decode: tokens {tuple(tokens_BS.shape)}, valid_BS {tuple(valid_BS.shape)} and a cache "
                f"of batch {past_valid_BL.shape[0]} must agree on B (and S)"
            )
        valid_BL = torch.cat([past_valid_BL, valid_BS], dim=1)
        # A token's position: the real tokens of its row before it.
        positions_BS = past_valid_BL.sum(dim=1, keepdim=True) + valid_BS.cumsum(dim=1) - valid_BS.long()
        columns_L = torch.arange(past + S, device=device)
        query_S1 = (past + torch.arange(S, device=device)).unsqueeze(1)
        mask_BSL = (columns_L <= query_S1) & (valid_BL.unsqueeze(1) | (columns_L == query_S1))
        x_BSD = self.tok_emb(tokens_BS) + self.pos_emb(positions_BS)
        inference = Inference(capacity_factor, tokens_per_rank)
        keys, values, outputs = [], [], []
        for i, block in enumerate(self.blocks):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x_BSD, moe, (k_BNLA, v_BNLA) = block(x_BSD, None, kv, mask_BSL, inference)
            keys.append(k_BNLA)
            values.append(v_BNLA)
            if moe is not None:
                outputs.append(moe)
        logits_BSV, cache = self.lm_head(self.norm(x_BSD)), KVCache(tuple(keys), tuple(values), valid_BL)
        if record_routes:
            return logits_BSV, cache, stack_routes(outputs, B)
        return logits_BSV, cache

    @torch.no_grad()
    def generate(
        self,
        prompt_tokens: Tensor | list[Tensor],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        *,
        capacity_factor: float | None = None,
        use_cache: bool = True,
        batch_per_rank: int | None = None,
        width: int | None = None,
        record_routes: bool = False,
    ) -> Tensor | list[Tensor] | tuple:
        """prompt [S0] -> [S0 + max_new_tokens]; a list of B prompts of any lengths -> a list of
        B such tensors, decoded as one batch. Each token is sampled from the logits over the last
        seq_len tokens (the window slides once a row is longer), divided by `temperature`
        (0: greedy) and restricted to the `top_k` most likely. `generator` (on the model's device)
        makes the samples reproducible.

        A batch is left-padded to one width and the padding masked (`decode`'s valid_BS), so
        each row gets what it would get alone. With `use_cache` the prompts are prefilled
        once and each new token then runs alone against the KV cache. Once the padded width
        passes seq_len every step refills the window (its positions shift), which costs what
        decoding without a cache does. use_cache=False runs the whole window every step: the
        reference the cache is tested against.

        capacity_factor: the MoE layers route dropless (None, the default) whatever they were
            trained with: with a capacity a later token can push an earlier one out of a full
            expert, so decoding token by token could not equal the forward over the sequence.
            A factor applies the capacity rule to each call's tokens instead.
        batch_per_rank: the most prompts any rank of an expert-parallel group decodes (None:
            this call's B, which must then be the same on every rank); the bound of the fixed
            dispatch in the one-token steps.
        width: left-pad the prompts to at least this width. Under expert parallelism every
            rank must run the same forwards: call with the same max_new_tokens, use_cache,
            batch_per_rank and width (at least the longest prompt of any rank).
        record_routes: also return the routes of every position, prompt and generated:
            (tokens, routes), routes [S0 + n, L_moe, K] long per prompt (a list for a list), the
            MoE layers' logical expert ids, which `forward(..., routes=)` over the same tokens
            replays. Each position's are from the call that first ran it as its newest token
            (the prefill for the prompt; a refilled window's last column for later tokens); a
            position left of a window that was never run is -1 (route natively). The last
            token, which generation itself never runs, is routed by one more decode step
            (every rank of a group runs it: pass the same record_routes on all).
        Call model.eval() first: in training mode the MoE layers keep to their usual dispatch.
        """
        single = isinstance(prompt_tokens, Tensor)
        prompts = [prompt_tokens] if single else list(prompt_tokens)
        if not prompts or any(p.dim() != 1 or p.numel() == 0 for p in prompts):
            shapes = [tuple(p.shape) for p in prompts]
            raise ValueError(f"generate expects a non-empty prompt [S0] or a list of them, got {shapes}")
        if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError(
                f"generate needs max_new_tokens >= 0, temperature >= 0, top_k >= 1 or None; got "
                f"{max_new_tokens}, {temperature}, {top_k}"
            )
        tokens_BW, valid_BW = _left_pad(prompts, width or 0)
        prompt_width, window = tokens_BW.shape[1], self.config.seq_len
        bound = len(prompts) if batch_per_rank is None else batch_per_rank
        cache, routes = None, []  # routes: [B, S, L_moe, K] per call, its new columns only
        for step in range(max_new_tokens + int(record_routes)):
            if not use_cache or cache is None or cache.length == window:
                logits_BSV, cache, *recorded = self.decode(
                    tokens_BW[:, -window:],
                    valid_BS=valid_BW[:, -window:],
                    capacity_factor=capacity_factor,
                    record_routes=record_routes,
                )
            else:
                logits_BSV, cache, *recorded = self.decode(
                    tokens_BW[:, -1:],
                    cache,
                    capacity_factor=capacity_factor,
                    tokens_per_rank=bound,
                    record_routes=record_routes,
                )
            if record_routes:
                routes.append(_new_columns(recorded[0], tokens_BW.shape[1], first=not routes))
            if step == max_new_tokens:  # the recording's extra step: the last token is routed
                break
            next_B = _sample(logits_BSV[:, -1].float(), temperature, top_k, generator)
            tokens_BW = torch.cat([tokens_BW, next_B.unsqueeze(1).to(tokens_BW.dtype)], dim=1)
            valid_BW = F.pad(valid_BW, (0, 1), value=True)
        starts = [prompt_width - p.numel() for p in prompts]
        rows = [tokens_BW[b, start:] for b, start in enumerate(starts)]
        if not record_routes:
            return rows[0] if single else rows
        routes_BWLK = torch.cat(routes, dim=1)
        route_rows = [routes_BWLK[b, start:] for b, start in enumerate(starts)]
        return (rows[0], route_rows[0]) if single else (rows, route_rows)


def _new_columns(routes_BSLK: Tensor, width: int, first: bool) -> Tensor:
    """The columns a generation call adds to the recording: all `width` of the first call (-1 left of
    its window), the last one of every later call."""
    if not first:
        return routes_BSLK[:, -1:]
    return F.pad(routes_BSLK, (0, 0, 0, 0, width - routes_BSLK.shape[1], 0), value=-1)


def next_token_loss(
    model, tokens: Tensor, choices_before: list[Tensor | None] | None, routes: Tensor | None, who: str
) -> tuple[Tensor, Tensor, list[MoEOutput]]:
    """(lm_loss, aux_loss, MoE outputs) of `model(tokens[:, :-1], choices_before, routes=...)`
    predicting tokens[:, 1:]: Transformer.loss, and HFCausalLM.loss for a loaded model. `routes`
    may cover tokens[:, :-1] or all of `tokens` (a recording's; the last position is not used)."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"{who} expects tokens [B, S + 1] with S >= 1, got {tuple(tokens.shape)}")
    if routes is not None and routes.dim() >= 2 and routes.shape[1] == tokens.shape[1]:
        routes = routes[:, :-1]
    logits_BSV, outputs = model(tokens[:, :-1], choices_before, routes=routes)
    # NOTE: fp32 cross-entropy, so that low-precision logits do not lose the loss's small differences.
    lm_loss = F.cross_entropy(logits_BSV.flatten(0, 1).float(), tokens[:, 1:].reshape(-1))
    aux_loss = torch.zeros((), device=lm_loss.device)
    for moe in outputs:
        aux_loss = aux_loss + moe.aux_loss
    return lm_loss, aux_loss, outputs


def _left_pad(prompts: list[Tensor], width: int) -> tuple[Tensor, Tensor]:
    """(tokens [B, W], valid [B, W]): the prompts right-aligned in W = max(width, longest) columns."""
    W = max(width, *(p.numel() for p in prompts))
    tokens_BW = prompts[0].new_zeros((len(prompts), W))
    valid_BW = torch.zeros(len(prompts), W, dtype=torch.bool, device=prompts[0].device)
    for b, prompt in enumerate(prompts):
        tokens_BW[b, W - prompt.numel() :] = prompt
        valid_BW[b, W - prompt.numel() :] = True
    return tokens_BW, valid_BW


def _sample(logits_BV: Tensor, temperature: float, top_k: int | None, generator) -> Tensor:
    """[B] next tokens: the argmax at temperature 0, else a draw from softmax(logits / temperature)
    over the top_k most likely."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_largest_B1 = torch.topk(logits_BV, top_k).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_largest_B1, float("-inf"))
    return torch.multinomial(logits_BV.softmax(dim=-1), 1, generator=generator).squeeze(1)


def _linear(d_in: int, d_out: int, std: float) -> nn.Linear:
    linear = nn.Linear(d_in, d_out, bias=False)
    linear.init_std = std  # Transformer._reset_dense draws N(0, std)
    return linear


def _residual_std(config: ModelConfig) -> float:
    """GPT-2: each of the 2 * n_layers residual additions is scaled down, so the stream keeps its variance."""
    return _INIT_STD / math.sqrt(2 * config.n_layers)

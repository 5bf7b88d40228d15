"""MoEConfig: the one validated description of a Mixture-of-Experts layer."""

from __future__ import annotations

import math
import tomllib
import typing
from dataclasses import dataclass, fields
from pathlib import Path

SCORE_FUNCS = ("softmax", "sigmoid")
DROP_POLICIES = ("position", "probs")
ACTIVATIONS = ("relu", "gelu", "silu", "swiglu")


@dataclass(frozen=True)
class MoEConfig:
    """What an MoE layer computes; identical on every rank of a group.

    d_model: input width D.            d_hidden: expert hidden width H.
    d_out: output width O (None -> d_model; resolved at construction).
    num_experts: E, the global expert count.      top_k: K choices per token.
    score_func: "softmax" (over all E) or "sigmoid" (per expert).
    normalize_weights: rescale the K chosen scores to sum to 1.
    capacity_factor: C = max(min_capacity, ceil(capacity_factor * T * K / E))
        assignments kept per expert, T = tokens in the call on this rank;
        None means dropless (every assignment kept).
    drop_policy: which assignments an over-full expert keeps:
        "position" (choice rank, then token index) or "probs" (highest score).
    max_tokens_per_expert: a hard bound on the rows one expert may receive in
        one forward, summed over the group; over it, every rank raises
        ValueError instead of running out of memory (None: no bound).
    activation: "relu", "gelu", "silu", or "swiglu" (act(x@w1) * (x@w3)) @ w2.
    bias: experts carry biases.        router_bias: the router Linear has a bias.
    aux_loss_coef, z_loss_coef: weights of the load-balancing and z losses in
        `MoELayer.aux_loss`.

    Defaults follow the modern dropless top-2 softmax router (Mixtral-like
    routing, SimpleMoE-like experts): see README "Configuration".
    """

    d_model: int
    d_hidden: int
    num_experts: int
    top_k: int = 2
    d_out: int | None = None
    score_func: str = "softmax"
    normalize_weights: bool = True
    capacity_factor: float | None = None
    min_capacity: int = 4
    drop_policy: str = "position"
    max_tokens_per_expert: int | None = None
    activation: str = "relu"
    bias: bool = True
    router_bias: bool = True
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        for name in ("d_model", "d_hidden", "num_experts", "top_k"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.d_out is None:
            object.__setattr__(self, "d_out", self.d_model)
        _check_int("d_out", self.d_out, minimum=1)
        _check_int("min_capacity", self.min_capacity, minimum=0)
        if self.max_tokens_per_expert is not None:
            _check_int("max_tokens_per_expert", self.max_tokens_per_expert, minimum=1)
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        _check_choice("score_func", self.score_func, SCORE_FUNCS)
        _check_choice("drop_policy", self.drop_policy, DROP_POLICIES)
        _check_choice("activation", self.activation, ACTIVATIONS)
        for name in ("normalize_weights", "bias", "router_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MoEConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.capacity_factor is not None:
            _check_real("capacity_factor", self.capacity_factor)
            if not self.capacity_factor > 0:
                raise ValueError(
                    f"MoEConfig.capacity_factor must be > 0 or None (dropless), got {self.capacity_factor!r}"
                )
        for name in ("aux_loss_coef", "z_loss_coef"):
            _check_real(name, getattr(self, name))
            if getattr(self, name) < 0:
                raise ValueError(f"MoEConfig.{name} must be >= 0, got {getattr(self, name)!r}")

    @property
    def dropless(self) -> bool:
        return self.capacity_factor is None

    def capacity(self, num_tokens: int) -> int | None:
        """Assignments each expert keeps for `num_tokens` tokens; None when dropless."""
        if self.capacity_factor is None:
            return None
        wanted = math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)
        return max(self.min_capacity, wanted)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> MoEConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"MoEConfig has no field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def load_toml(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Read a TOML file and apply dotted `section.key=value` overrides (command line > TOML).

    Values parse as TOML (`4`, `1.25`, `true`, `"gelu"`); `none` means None
    (e.g. `moe.capacity_factor=none` for dropless); anything else is a string.
    Each override's sections must exist in the file; the consumer of a section
    (e.g. MoEConfig.from_dict) rejects unknown keys by name.
    """
    with open(path, "rb") as handle:
        tree = tomllib.load(handle)
    for item in overrides:
        key, sep, raw = item.partition("=")
        *sections, leaf = key.strip().split(".")
        if not sep or not sections or not leaf:
            raise ValueError(f"override {item!r} must look like section.key=value")
        node = tree
        for section in sections:
            if not isinstance(node.get(section), dict):
                raise ValueError(f"override {item!r}: no section {section!r} in {path}")
            node = node[section]
        node[leaf] = _parse_value(raw.strip())
    return tree


def from_section(cls: type, section: str, values: dict):
    """Build the dataclass `cls` from a TOML section, naming `section.key` in every error.

    Unknown keys are rejected; values must match the field's annotation (int,
    float, str, bool, or those | None); an int is accepted for a float.
    """
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"unknown key(s) {[f'{section}.{k}' for k in unknown]}; known: {sorted(hints)}")
    converted = {}
    for key, value in values.items():
        allowed = typing.get_args(hints[key]) or (hints[key],)
        if value is None and type(None) in allowed:
            converted[key] = None
        elif float in allowed and isinstance(value, int) and not isinstance(value, bool):
            converted[key] = float(value)
        elif any(t is not type(None) and type(value) is t for t in allowed):
            converted[key] = value
        else:
            names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
            raise ValueError(f"{section}.{key} must be {names}, got {value!r}")
    return cls(**converted)


def _parse_value(raw: str) -> object:
    if raw.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return raw


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"MoEConfig.{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"MoEConfig.{name} must be >= {minimum}, got {value!r}")


def _check_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"MoEConfig.{name} must be a finite number, got {value!r}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"MoEConfig.{name} must be one of {choices}, got {value!r}")

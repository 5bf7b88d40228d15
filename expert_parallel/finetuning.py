"""Fine-tuning a Hugging Face MoE model directory, data x expert parallel, then exporting it as it came.

`launch.finetune` is its command line. The model is loaded with
`expert_parallel.hf.from_pretrained`: every rank reads the dense tensors and
only its own experts. world = dp x ep ranks as in training.py
(parallel.ep, parallel.fsdp, parallel.redundant_experts), and the same
Trainer runs it: the same global batch split in micro-batches, gradient
sums, AdamW, clipping, checkpoints every train.checkpoint_every steps under
<out_dir>/checkpoints with exact resume (relaunch the same command),
metrics.jsonl and summary.json. [moe] holds MoEConfig overrides for every
MoE layer (capacity_factor, aux_loss_coef, aux_loss_scope,
selection_bias_rate, ...), [execution] how the layers run (dispatch, ...).

Data: data.text, a UTF-8 text file (the last data.val_fraction of it for
validation), or the Python standard library when unset. Tokens: the model's
own tokenizer where the directory has one (data.tokenizer = "auto"), else
the bytes modulo the vocabulary ("bytes").

At the end (model.export = true) the model is written with
`expert_parallel.hf.save_pretrained` to <out_dir>/export: the directory
transformers' `from_pretrained` loads, under the checkpoint's own names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist

from . import data
from .build import apply_fsdp
from .config import ExecutionConfig, check_bool, check_choice, check_int, check_real, from_section
from .config_file import check_sections
from .hf import HFCausalLM, from_pretrained, save_pretrained
from .lora import LoraConfig, add_lora, save_adapter
from .training import ParallelConfig, TrainConfig, Trainer

DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class PretrainedConfig:
    path: str  # a Hugging Face model directory (config.json and *.safetensors)
    dtype: str = "auto"  # of the loaded parameters: "auto" (the checkpoint config's), "fp32", "bf16"
    trust_remote_code: bool = False  # run the directory's own modelling code (off: nothing of it runs)
    export: bool = True  # write <out_dir>/export with save_pretrained after the last step

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError("model.path must name a Hugging Face model directory")
        check_choice("model", "dtype", self.dtype, tuple(DTYPES))
        check_bool("model", "trust_remote_code", self.trust_remote_code)
        check_bool("model", "export", self.export)


@dataclass(frozen=True)
class DataConfig:
    seq_len: int = 128  # tokens each training sequence predicts
    text: str | None = None  # a UTF-8 text file; None: the Python standard library
    val_fraction: float = 0.05  # of data.text, its end, kept for validation
    tokenizer: str = "auto"  # "auto": the directory's tokenizer if it has one, else "bytes" (% vocab)

    def __post_init__(self) -> None:
        check_int("data", "seq_len", self.seq_len, minimum=1)
        check_real("data", "val_fraction", self.val_fraction)
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction!r}")
        check_choice("data", "tokenizer", self.tokenizer, ("auto", "bytes"))


@dataclass(frozen=True)
class FinetuneConfig:
    model: PretrainedConfig
    train: TrainConfig
    parallel: ParallelConfig
    data: DataConfig = DataConfig()
    execution: ExecutionConfig = ExecutionConfig()
    moe: dict = field(default_factory=dict)  # MoEConfig overrides, checked by from_pretrained
    lora: LoraConfig | None = None  # adapters on a frozen model; None (an empty [lora]): full fine-tuning

    SECTIONS = ("model", "moe", "execution", "data", "train", "parallel", "lora")

    def __post_init__(self) -> None:
        for name in ("compile", "activation_checkpointing"):
            if getattr(self.train, name):
                raise ValueError(f"train.{name} = true is not supported by launch.finetune yet")
        if self.train.init_from:
            raise ValueError(
                "train.init_from (sparse upcycling) is for launch.train's models: launch.finetune "
                "loads model.path; upcycle a Hugging Face model with launch.upcycle --hf"
            )
        if self.lora is not None:
            for name in ("fsdp", "redundant_experts"):
                if getattr(self.parallel, name):
                    raise ValueError(f"[lora] with parallel.{name} is not supported yet")

    @classmethod
    def from_tree(cls, tree: dict) -> FinetuneConfig:
        check_sections(tree, cls.SECTIONS)
        misplaced = sorted(set(tree.get("moe", {})) & {f.name for f in fields(ExecutionConfig)})
        if misplaced:
            raise ValueError(
                f"moe.{misplaced[0]} is how the layers run, not what they compute: "
                f"set it in [execution] (execution.{misplaced[0]})"
            )
        return cls(
            model=from_section(PretrainedConfig, "model", tree.get("model", {})),
            train=from_section(TrainConfig, "train", tree.get("train", {})),
            parallel=from_section(ParallelConfig, "parallel", tree.get("parallel", {})),
            data=from_section(DataConfig, "data", tree.get("data", {})),
            execution=from_section(ExecutionConfig, "execution", tree.get("execution", {})),
            moe=dict(tree.get("moe", {})),
            lora=LoraConfig.from_section(tree["lora"]) if tree.get("lora") else None,
        )

    def to_dict(self) -> dict:
        return {
            "model": asdict(self.model),
            "moe": dict(self.moe),
            "execution": self.execution.to_dict(),
            "data": asdict(self.data),
            "train": asdict(self.train),
            "parallel": asdict(self.parallel),
            "lora": asdict(self.lora) if self.lora is not None else {},
        }


class FineTuner(Trainer):
    """training.Trainer over a loaded Hugging Face model (HFCausalLM) and its tokens."""

    @property
    def seq_len(self) -> int:
        return self.config.data.seq_len

    def build(self, param_dtype: torch.dtype | None) -> HFCausalLM:
        config, layout = self.config, self.layout
        self.say(f"loading {config.model.path} (each rank its experts: ep {layout.ep})")
        hf_model = from_pretrained(
            config.model.path,
            layout.ep_group,
            dtype=DTYPES[config.model.dtype],
            trust_remote_code=config.model.trust_remote_code,
            stats_group=dist.group.WORLD if layout.world > 1 else None,
            execution=config.execution,
            **config.moe,
        )
        if config.lora is not None:
            adapted = add_lora(hf_model, config.lora)
            self.say(f"LoRA r={config.lora.r} on {len(adapted)} modules ({', '.join(config.lora.targets)})")
        model = HFCausalLM(hf_model.to(self.device)).train()
        if config.parallel.fsdp:
            apply_fsdp(model, layout, param_dtype)
        return model

    def load_corpora(self) -> tuple[data.ByteCorpus, data.ByteCorpus]:
        config = self.config.data
        vocab = self.model.hf.config.get_text_config().vocab_size
        if config.text is None:
            raw = super().load_corpora()  # the standard library, split by file, capped
        else:
            text = Path(config.text).read_bytes()
            cut, cap = round(len(text) * (1 - config.val_fraction)), self.config.train.max_corpus_bytes
            raw = tuple(data.ByteCorpus.from_bytes(part[:cap]) for part in (text[:cut], text[cut:]))
        tokenizer = self.tokenizer()
        if tokenizer is None:  # NOTE: uint8 % vocab stays uint8: a byte per token in memory
            return tuple(data.ByteCorpus(c.data % vocab if vocab < 256 else c.data, c.num_files) for c in raw)
        corpora = []
        for corpus in raw:
            text = corpus.data.numpy().tobytes().decode("utf-8", errors="replace")
            ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.int32)
            if ids.numel() and int(ids.max()) >= vocab:
                raise ValueError(
                    f"the tokenizer gives id {int(ids.max())}, beyond the model's vocabulary {vocab}"
                )
            corpora.append(data.ByteCorpus(ids, corpus.num_files))
        return corpora[0], corpora[1]

    def tokenizer(self):
        """The directory's tokenizer (data.tokenizer = "auto" and one is there), else None (bytes)."""
        path = Path(self.config.model.path)
        if self.config.data.tokenizer == "bytes" or not any((path / f).is_file() for f in TOKENIZER_FILES):
            self.say("tokens: bytes modulo the vocabulary")
            return None
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=self.config.model.trust_remote_code)
        self.say(f"tokens: {type(tokenizer).__name__} of {path}")
        return tokenizer

    def run(self) -> dict:
        summary = super().run()
        if self.config.model.export and self.config.lora is not None:
            adapter = save_adapter(
                self.model.hf, Path(self.config.train.out_dir) / "adapter", self.config.lora
            )
            self.say(f"adapter saved to {adapter} (PEFT's format)")
        elif self.config.model.export:
            self.say(f"exported to {self.export(Path(self.config.train.out_dir) / 'export')}")
        return summary

    def export(self, path: Path) -> Path:
        """save_pretrained of the model as trained (one copy of each expert), on every rank together."""
        for _, layer in self.model.moe_layers():
            if layer.placement is not None:
                layer.apply_placement(None, self.optimizer)
        return save_pretrained(self.model.hf, path)

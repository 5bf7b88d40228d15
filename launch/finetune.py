"""Fine-tune a Hugging Face MoE model directory, data x expert parallel, then export it in its own format.

    torchrun --standalone --nproc-per-node 2 -m launch.finetune --config configs/finetune.toml \\
        model.path=/path/to/model [section.key=value ...]

The fine-tuner itself is expert_parallel.finetuning (FineTuner,
FinetuneConfig): the model loaded by shard with
`expert_parallel.hf.from_pretrained`, trained by the same Trainer as
launch.train (checkpoints, exact resume, metrics.jsonl, summary.json), and
written with `expert_parallel.hf.save_pretrained` to <out_dir>/export
(model.export = true). Sections: [model] (path, dtype, trust_remote_code,
export), [moe] MoEConfig overrides, [execution], [data], [train],
[parallel]; see docs/finetuning.md.
"""

from __future__ import annotations

import sys

from expert_parallel.config_file import command_line
from expert_parallel.finetuning import FinetuneConfig, FineTuner
from expert_parallel.training import run_training


def main(argv: list[str]) -> int:
    return run_training(FinetuneConfig.from_tree(command_line(__doc__, argv)), trainer_class=FineTuner)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

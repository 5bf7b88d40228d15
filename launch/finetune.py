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

import argparse
import sys

from expert_parallel.config_file import load_toml
from expert_parallel.finetuning import FinetuneConfig, FineTuner
from expert_parallel.training import run_training


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    config = FinetuneConfig.from_tree(load_toml(args.config, args.overrides))
    return run_training(config, trainer_class=FineTuner)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

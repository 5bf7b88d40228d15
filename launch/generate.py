"""Print text from a trained model.

    python -m launch.generate --checkpoint runs/tiny --prompt "def " [--tokens 200] [--temperature 0.8]

--checkpoint is a run's out_dir (its latest checkpoint is used) or one
`checkpoints/step_<N>` directory. One process holds all experts, whatever
the ep size the checkpoint was saved with.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from expert_parallel import checkpoint
from expert_parallel.model import ModelConfig, Transformer


def find_checkpoint(path: Path) -> tuple[Path, Path]:
    """(checkpoint directory, the run's out_dir) for an out_dir or a step directory."""
    if (path / ".metadata").is_file():
        return path, path.parent.parent
    latest = checkpoint.latest(path / "checkpoints")
    if latest is None:
        raise SystemExit(f"no checkpoint under {path / 'checkpoints'}: train with train.checkpoint_every > 0")
    return latest, path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    step_dir, out_dir = find_checkpoint(args.checkpoint)
    config = ModelConfig.from_dict(json.loads((out_dir / "config.json").read_text())["model"])
    model = Transformer(config)
    step = checkpoint.load(step_dir, model)
    model.eval()
    prompt = torch.tensor(list(args.prompt.encode()), dtype=torch.long)
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        tokens = model.generate(prompt, args.tokens, args.temperature, args.top_k, generator=generator)
    print(f"# {step_dir} (step {step})", file=sys.stderr)
    print(bytes(tokens.tolist()).decode("utf-8", errors="replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

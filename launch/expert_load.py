"""(Re)draw a run's expert-load picture: <out_dir>/expert_load.png from its metrics.jsonl.

    python -m launch.expert_load runs/tiny          # (re)writes runs/tiny/expert_load.png

The picture is expert_parallel.expert_load's (standard library only), the
one the trainer writes at the end of a run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from expert_parallel.expert_load import write_png


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out_dir = Path(argv[0])
    print(write_png(out_dir / "metrics.jsonl", out_dir / "expert_load.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""One rank of the load-memory test: RSS before and after expert_parallel.hf.from_pretrained (argv[1]).

Prints `MEMORY {json}`: resident MiB before the load (after imports), the peak
during it (ru_maxrss), and the MiB of the tensors the loaded model holds.
"""

from __future__ import annotations

import gc
import json
import sys

import torch
import transformers  # noqa: F401  imported before measuring, as a user's script would have
from transformers.models.mixtral import modeling_mixtral  # noqa: F401

import expert_parallel as ep
from expert_parallel import memory
from expert_parallel.hf import from_pretrained

ep.init_distributed("gloo")
try:
    before = memory.rss_mib()
    model = from_pretrained(sys.argv[1], torch.distributed.group.WORLD)
    held = sum(t.nbytes for t in [*model.parameters(), *model.buffers()]) / 2**20
    print("MEMORY " + json.dumps({"before": before, "peak": memory.peak_rss_mib(), "held": held}), flush=True)
    del model
    gc.collect()
finally:
    ep.shutdown()

"""Stage 1 as ``bench.gpu_check`` compares it over numbers of processes: the classifier's dropout
off (each process draws its own masks, the one draw that depends on how many run; NOTES), and
each rank's peak memory written to ``SAVE/peak_rank{R}.json``.

    python -m bench.stage1_ranks STAGE1_FLAGS
    torchrun --nproc_per_node 2 -m bench.stage1_ranks STAGE1_FLAGS
"""
import json
import os
import resource
import sys
from pathlib import Path

import torch
from torch import nn

import utils.torch_floor  # noqa: F401  (first: an older torch stops here, with one line)
from bench.memory import stage_script
from utils.runtime import fail_cleanly


def main(argv: list[str]) -> None:
    stage1 = stage_script("01train_supernet.py")
    build = stage1.build_supernet

    def without_dropout(**config):
        model = build(**config)
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0  # F.dropout at p = 0 returns its input and draws nothing
        return model

    stage1.build_supernet = without_dropout
    args = stage1.parse_args(argv)
    fail_cleanly(stage1.train, args)
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    peak = (torch.cuda.max_memory_allocated() if cuda  # the device's, or the host's resident set
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    rank = int(os.environ.get("RANK", "0"))
    (Path(args.save) / f"peak_rank{rank}.json").write_text(json.dumps({"peak": peak, "cuda": cuda}))


if __name__ == "__main__":
    main(sys.argv[1:])

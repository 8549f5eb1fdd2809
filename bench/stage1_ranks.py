"""Stage 1 as ``bench.gpu_check`` compares it over numbers of processes, the classifier's dropout
on (each piece's masks from a generator of its own: ``training.pieces.Draws``), each rank's peak
memory written to ``SAVE/peak_rank{R}.json``, and rank 0's first step recorded to
``SAVE/first_step.pt`` (``bench.step_compare``'s case: the state before the LSQ initialisation,
before and after the step, Adam's state, the gradients, the loss, the gradient norm, two images;
``recording`` records any step so, ``bench.gpu_check``'s resumed run too).

    python -m bench.stage1_ranks STAGE1_FLAGS
    torchrun --nproc_per_node 2 -m bench.stage1_ranks STAGE1_FLAGS
"""
import json
import os
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

import utils.torch_floor  # noqa: F401  (first: an older torch stops here, with one line)
from bench.memory import stage_script
from utils import distributed
from utils.runtime import fail_cleanly

FIRST_STEP = "first_step.pt"


def cpu(state: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


@contextmanager
def recording(stage1, path: Path, at: int = 1) -> Iterator[dict]:
    """While open, ``stage1`` records the ``at``-th step this process runs to ``path`` (rank 0), with
    the optimizer's state before it and, where this run initialises the LSQ steps, the model's
    state before that; yields the case as it fills. ``stage1``'s functions are restored on exit."""
    case: dict = {}
    build, initialise, step = stage1.build_supernet, stage1.initialize_activation_steps, stage1.stage_step
    steps = 0

    def built(**config):
        case["config"] = config
        return build(**config)

    def initialize_activation_steps(model, images, selection):
        case.setdefault("state_initial", cpu(model.state_dict()))
        return initialise(model, images, selection)

    def recorded_step(model, teacher, images, labels, selection, optimizer, amp, share, *how):
        nonlocal steps
        steps += 1
        if steps != at:
            return step(model, teacher, images, labels, selection, optimizer, amp, share, *how)
        named = dict(model.named_parameters())
        names = {id(p): n for n, p in named.items()}
        before = {names[id(p)]: cpu(s) for p, s in optimizer.state.items()}
        case.update(state_before=cpu(model.state_dict()), group_lrs=[g["lr"] for g in optimizer.param_groups],
                    batch={"x": images[:2].detach().cpu(), "selection": list(selection)})
        out = step(model, teacher, images, labels, selection, optimizer, amp, share, *how)
        loss = distributed.all_reduce_sum(out[1].detach().float() * (share.images / share.batch))
        stepped = {names[id(p)]: cpu(s) for p, s in optimizer.state.items()}
        case.update(
            state_after=cpu(model.state_dict()), optimizer_state_after=stepped,
            # Adam's state of a parameter it had not stepped yet: none, which is zeros
            optimizer_state_before={n: before.get(n) or {"step": torch.tensor(0.0),
                                                         "exp_avg": torch.zeros_like(s["exp_avg"]),
                                                         "exp_avg_sq": torch.zeros_like(s["exp_avg_sq"])}
                                    for n, s in stepped.items()},
            hyper={"lr": max(case["group_lrs"])}, loss=loss.item(), grad_norm_before_clipping=out[2].item(),
            grads={n: p.grad.detach().cpu().clone() for n, p in named.items() if p.grad is not None},
            parameters=list(named))
        if distributed.is_main():
            torch.save(case, path)
        return out

    stage1.build_supernet, stage1.initialize_activation_steps = built, initialize_activation_steps
    stage1.stage_step = recorded_step
    try:
        yield case
    finally:
        stage1.build_supernet, stage1.initialize_activation_steps, stage1.stage_step = build, initialise, step


def main(argv: list[str]) -> None:
    stage1 = stage_script("01train_supernet.py")
    args = stage1.parse_args(argv)
    with recording(stage1, Path(args.save) / FIRST_STEP):
        fail_cleanly(stage1.train, args)
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    peak = (torch.cuda.max_memory_allocated() if cuda  # the device's, or the host's resident set
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    rank = int(os.environ.get("RANK", "0"))
    (Path(args.save) / f"peak_rank{rank}.json").write_text(json.dumps({"peak": peak, "cuda": cuda}))


if __name__ == "__main__":
    main(sys.argv[1:])

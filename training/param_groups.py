"""Which parameters each stage trains, and with which decay, found by module type."""
from collections.abc import Iterator

from torch import nn

from quant import ClipActivation


def _clip_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, ClipActivation]]:
    for name, m in model.named_modules():
        if isinstance(m, ClipActivation):
            yield f"{name}.upper_bound" if name else "upper_bound", m.upper_bound, m


def stage1_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Adam groups of stage 1 (SPEC section 3).

    Conv weights (4-D parameters and the flat ``weights`` of quantized convs) decay with
    ``weight_decay``; the clips of branch ``j`` form group ``j`` with that branch's L2 decay;
    BN, LSQ steps and the classifier get none; parameters that are never optimized (``bin``) are
    left out.
    Each group carries ``names`` for logging and tests.
    """
    clips = {id(p): m for _, p, m in _clip_params(model)}
    num_branches = max((m.branch for m in clips.values()), default=-1) + 1
    branch_groups = [dict(params=[], names=[], weight_decay=0.0) for _ in range(num_branches)]
    decayed = dict(params=[], names=[], weight_decay=weight_decay)
    other = dict(params=[], names=[], weight_decay=0.0)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in clips:
            group = branch_groups[clips[id(p)].branch]
            group["weight_decay"] = clips[id(p)].l2
        elif p.dim() == 4 or name.endswith(".weights"):
            group = decayed
        else:
            group = other
        group["params"].append(p)
        group["names"].append(name)
    return [*branch_groups, decayed, other]


def stage3_param_groups(model: nn.Module, lr: float, train_clip: bool = True) -> list[dict]:
    """SGD groups of stage 3 (SPEC section 5): biases, the clips under their branch's decay, and
    every other parameter at lr 0.

    The reference freezes with lr 0, not by leaving parameters out: the frozen ones still have
    gradients, which count in the gradient norm that is clipped. The last group holds them.
    """
    clips = {id(p): m for _, p, m in _clip_params(model)} if train_clip else {}
    groups: dict[float, dict] = {}
    biases = dict(params=[], names=[], lr=lr, weight_decay=0.0)
    frozen = dict(params=[], names=[], lr=0.0, weight_decay=0.0)
    for name, p in model.named_parameters():
        if not p.requires_grad:  # ``bin``: never optimized
            continue
        if id(p) in clips:
            l2 = clips[id(p)].l2
            group = groups.setdefault(l2, dict(params=[], names=[], lr=lr, weight_decay=l2))
        elif "bias" in name:
            group = biases
        else:
            group = frozen
        group["params"].append(p)
        group["names"].append(name)
    return [biases, *groups.values(), frozen]

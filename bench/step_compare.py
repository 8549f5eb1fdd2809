"""Comparing one of our steps with a recorded step: what the step changed. The tests compare with
the authors' loops (``tests/test_trajectories.py``, ``tests/test_dataparallel.py``), the prepared GPU
check stage 1 over two processes with one (``bench.gpu_check``).

Every tensor is compared by its update (after minus before), elementwise, against the recorded
update, with a tolerance derived from what float32 lets two implementations reproduce; the
optimizer's state (Adam's ``exp_avg``, ``exp_avg_sq``, ``step``; SGD's ``momentum_buffer``) likewise,
relative to its own scale. A comparison returns the tensors that fail, with why, so that a
mutation test can say which tensors a wrong step must fail on (``tests/test_mutations.py``).

The tolerances:

* **Gradient noise.** Each gradient element is a float32 sum over the batch and positions (up to
  ~10^4-10^5 terms here), summed in another order by another implementation, CPU kernel or thread
  count. Its error is bounded by about ``sqrt(n) * eps32`` times the terms' size for rounding errors
  that do not conspire (``n = 10^5``: 4e-5), and the terms' size is the tensor's largest gradient up
  to the cancellation inside the sum (a clip's gradient, a sum of upstream gradients of both
  signs, nets to a fraction of its terms). ``RHO = 2**-12`` (2.4e-4) of the tensor's largest
  recorded gradient covers that with a factor of 6; measured on the public recordings with this
  machine's default kernels: at most 2.1e-5. A wrong step changes gradients by far more (each mutation of
  ``tests/test_mutations.py`` is caught with it).
* **From a gradient to an update.** An update is a function of the gradient and the recorded
  optimizer state: SGD's ``lr * ((1 + momentum) * g + momentum**2 * b0)`` moves by ``lr * (1 +
  momentum)`` per unit of gradient; Adam's ``lr * m_hat / (sqrt(v_hat) + eps)`` by its derivative,
  bounded from the recorded state (``adam_sensitivity``). The tolerance of an element is that
  sensitivity times the gradient noise, plus the float32 rounding of the values themselves (one ulp
  of the value after, which each implementation rounds to its nearest float, and a few ulps of the
  update for Adam's own arithmetic). A parameter that should move by ``lr`` cannot pass by standing
  still, nor move where it should not: the tolerance is a small fraction of its recorded move.
* **Parameters whose gradient is zero in exact arithmetic** (``noise_gradient_parameters``): their
  recorded and computed gradients are float noise that no implementation reproduces, and Adam
  turns noise into a step of up to about lr. Compared by what is reproducible: both gradients
  below the noise bound ``eps32 * |g|``, and their update and optimizer state those that some
  gradient within that bound gives from the recorded state. ``|g|`` is the norm of all the
  clipped gradients: such a gradient is a sum over the batch and positions of the upstream
  gradients at the next BatchNorm's input, which cancels exactly, so what is left is their
  rounding, about ``eps32`` of their sum of magnitudes; those are gradients of the same loss as
  the parameters', of the order of ``|g|`` at most (measured: the noise stays below 1e-9 of
  ``|g|``, over a hundred times below the bound, while a real bias gradient lies far above it, so
  a live bias counted among these fails).
"""
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from quant import fused

EPS32 = torch.finfo(torch.float32).eps
RHO = 2.0**-12
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # the reference's ``torch.optim.Adam`` defaults (SPEC 3)
BN_MOMENTUM = 0.1  # PyTorch's default, every BatchNorm of the reference (SPEC 2)
# Operations that turn a per-channel constant added to their input into a per-channel constant
# added to their output (constant over the batch and the positions): sums, average pooling without
# padding, and regroupings of channels (the skip's repeats, chunk sums, channel padding).
SHIFT_PRESERVING = {"AddBackward0", "AvgPool2DBackward0", "RepeatBackward0", "SliceBackward0",
                    "ViewBackward0", "UnsafeViewBackward0", "UnsqueezeBackward0", "SumBackward1",
                    "ConstantPadNdBackward0", "ExpandBackward0", "CloneBackward0"}


# -- the parameters whose gradient is zero in exact arithmetic -----------------------------------

def _keeps_a_shift(node) -> bool:
    name = type(node).__name__
    if name == "AvgPool2DBackward0":
        return not any(node._saved_padding)
    if name == "ConstantPadNdBackward0":  # padding the channels only, not the positions
        return not any(node._saved_pad[:4])
    return name in SHIFT_PRESERVING


def _train_batch_norm(node) -> bool:
    return type(node).__name__ == "NativeBatchNormBackward0" and node._saved_training


def noise_gradient_parameters(model: nn.Module, x: torch.Tensor, selection: list[int]) -> set[str]:
    """The BatchNorm biases of ``model`` (train mode, ``selection``) whose gradient is zero in
    exact arithmetic, found from the autograd graph of one forward of ``x``.

    A BatchNorm's bias adds a per-channel constant to its output. Where every path from that
    output runs through operations that keep a per-channel constant one (``SHIFT_PRESERVING``: the
    skip, the sums, average pooling) into the input of a train-mode BatchNorm, which subtracts its
    batch mean, the constant never reaches the loss: the bias's gradient is zero, and what a float
    backward gives is rounding noise (``bn*_last.bias`` of every unit whose output only feeds the
    next units' BN_pre and skip). A path into anything else (a ReLU, a quantizer, a convolution,
    the classifier, the loss) makes it a real gradient. PyTorch's ops are traced (the fused CPU
    kernels off): their graph names each operation.
    """
    params = {id(p): n for n, p in model.named_parameters()}
    with fused.pytorch_only(), torch.enable_grad():
        out = model(x[:2], selection)  # the graph does not depend on the batch size
    consumers: dict = {}
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for position, (child, _) in enumerate(node.next_functions):
            if child is not None:
                consumers.setdefault(child, []).append((node, position))
                stack.append(child)
    found = set()
    for node in seen:
        if type(node).__name__ != "NativeBatchNormBackward0":
            continue
        bias = node.next_functions[2][0]
        if bias is None or id(getattr(bias, "variable", None)) not in params:
            continue
        if _shift_dies(node, consumers):
            found.add(params[id(bias.variable)])
    return found


def _shift_dies(start, consumers: dict) -> bool:
    """Whether a per-channel constant added at ``start``'s output dies in train-mode BatchNorms on
    every path to the output."""
    stack, seen = [start], set()
    while stack:
        node = stack.pop()
        users = consumers.get(node, [])
        if not users:
            return False  # the output itself
        for user, position in users:
            if _train_batch_norm(user) and position == 0:
                continue  # subtracted with the batch mean
            if not _keeps_a_shift(user):
                return False
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return True


# -- tolerances -------------------------------------------------------------------------------

def ulp(x: torch.Tensor) -> torch.Tensor:
    """A bound on one unit in the last place of float32 values (between one and two ulps), float64."""
    return (x.double().abs() * EPS32).clamp_min(2.0**-149)


def adam_sensitivity(lr: float, t: int, m1: torch.Tensor, v0: torch.Tensor, g: torch.Tensor,
                     noise: torch.Tensor) -> torch.Tensor:
    """A bound on ``|d update / d g|`` of Adam's step over gradients within ``noise`` of ``g``.

    ``u = lr/bc1 * m / D`` with ``m = b1 m0 + (1-b1) g``, ``v = b2 v0 + (1-b2) g^2``, ``D =
    sqrt(v/bc2) + eps``: ``du/dg = lr/bc1 * [(1-b1)/D - m (1-b2) g / (sqrt(bc2 v) D^2)]``, and
    ``(1-b2) g^2 <= v`` bounds the second term by ``lr/bc1 |m| sqrt(1-b2) / (sqrt(bc2) D^2)``. ``D``
    at its smallest over that range of gradients, ``|m|`` at its largest.
    """
    b1, b2 = ADAM_BETAS
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    small = (g.abs() - noise).clamp_min(0)
    d = torch.sqrt((b2 * v0 + (1 - b2) * small**2) / bc2) + ADAM_EPS
    m = m1.abs() + (1 - b1) * noise
    return lr / bc1 / d * ((1 - b1) + m * math.sqrt(1 - b2) / (math.sqrt(bc2) * d))


def _outside(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor | float) -> str | None:
    """Why ``actual`` is not ``expected`` within ``tol`` (elementwise), or ``None``."""
    diff = (actual.double() - expected.double()).abs()
    bad = diff > tol
    if not bool(bad.any()):
        return None
    tol = torch.as_tensor(tol, dtype=torch.float64).expand_as(diff)
    worst = int(torch.argmax(torch.where(bad, diff / tol.clamp_min(1e-300), 0.0)))
    return (f"{int(bad.sum())} of {diff.numel()} elements off, worst {diff.flatten()[worst]:.3g} "
            f"against a tolerance of {tol.flatten()[worst]:.3g}")


def _within(value: torch.Tensor, low: torch.Tensor, high: torch.Tensor, slack: torch.Tensor) -> str | None:
    value = value.double()
    bad = (value < low - slack) | (value > high + slack)
    if not bool(bad.any()):
        return None
    return f"{int(bad.sum())} of {value.numel()} elements outside what a noise-level gradient gives"


# -- the comparisons --------------------------------------------------------------------------

@dataclass
class Step:
    """Our step from a recorded state: the names of the model's parameters, its state and our
    optimizer's state after it (per parameter name), the gradients the optimizer stepped with
    (clipped), the loss and the gradient norm before clipping."""

    parameters: list[str]
    state_after: dict[str, torch.Tensor]
    optimizer_after: dict[str, dict[str, torch.Tensor]]
    grads: dict[str, torch.Tensor]
    loss: float
    grad_norm: float


def statistics_tolerance(k: str, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]
                         ) -> torch.Tensor:
    """The tolerance of a BatchNorm buffer's update, ``momentum * (batch statistic - running)``.

    A batch statistic is a float32 sum over the batch and positions, whose noise scales with the
    values summed, not with the result: a batch mean that nets to about 0 (the input of a BN_pre
    is the previous BN_last's output, of mean its bias) is still off by the noise of values of
    the size of its channel's spread. So ``RHO`` of the channel's second moment ``var + mean^2``
    (its square root for the mean), both taken from the recorded update.
    """
    prefix = k.rsplit(".", 1)[0]
    kept = 1 - BN_MOMENTUM
    mean, var = ((after[f"{prefix}.{s}"].double() - kept * before[f"{prefix}.{s}"].double()) / BN_MOMENTUM
                 for s in ("running_mean", "running_var"))
    second = var.abs() + mean * mean
    scale = second.sqrt() if k.endswith("running_mean") else second
    return BN_MOMENTUM * RHO * scale + 2 * ulp(after[k])


def _buffer(k: str, actual: torch.Tensor, before: dict[str, torch.Tensor],
            after: dict[str, torch.Tensor]) -> str | None:
    """A buffer: integers exactly, BatchNorm statistics by ``statistics_tolerance``; one that the
    recorded pass left as it was must stay exactly so."""
    if not after[k].is_floating_point() or torch.equal(before[k], after[k]):
        return None if torch.equal(actual, after[k]) else f"{actual.tolist()} against {after[k].tolist()}"
    return _outside(actual.double() - before[k].double(), after[k].double() - before[k].double(),
                    statistics_tolerance(k, before, after))


def compare_values(model: nn.Module, recorded_before: dict[str, torch.Tensor],
                   recorded_after: dict[str, torch.Tensor]) -> dict[str, str]:
    """A state that a forward pass sets (the LSQ initialisation, the weight steps'
    re-initialisation), tensor by tensor: the buffers as ``_buffer``; each parameter the pass sets
    (a step ``2 mean|x| / sqrt(Qp)``, a mean of magnitudes: no cancellation) within ``RHO`` of its
    value, and every other exactly as it was. Returns ``{name: why}`` of what fails."""
    actual = model.state_dict()
    assert sorted(actual) == sorted(recorded_after)
    params = dict(model.named_parameters())
    failures = {}
    for k, after in recorded_after.items():
        if k in params:
            why = _outside(actual[k], after, RHO * after.double().abs() + 2 * ulp(after))
        else:
            why = _buffer(k, actual[k], recorded_before, recorded_after)
        if why:
            failures[k] = why
    return failures


def recorded_gradient(case: dict, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient (clipped, weight decay included) the recorded step gave ``name``, from its
    optimizer state, and the rounding error of recovering it so (float64)."""
    before, after = case["optimizer_state_before"][name], case["optimizer_state_after"][name]
    if "exp_avg" in after:
        b1 = ADAM_BETAS[0]
        m0, m1 = before["exp_avg"].double(), after["exp_avg"].double()
        return (m1 - b1 * m0) / (1 - b1), (ulp(m1) + b1 * ulp(m0)) / (1 - b1)
    mu = case["hyper"]["momentum"]
    b0, b1 = before["momentum_buffer"].double(), after["momentum_buffer"].double()
    return b1 - mu * b0, ulp(b1) + mu * ulp(b0)


def compare_step(case: dict, step, noise_params: Iterable[str]) -> dict[str, str]:
    """Our ``step`` against the recorded ``case``: the loss and gradient
    norm, every tensor's update, and every optimizer state. Returns ``{what: why}`` of what fails
    (``name``, ``name.exp_avg``, ``loss``, ...)."""
    failures: dict[str, str] = {}
    noise_params = set(noise_params)
    for what, ours, recorded in (("loss", step.loss, case["loss"]),
                                 ("grad_norm", step.grad_norm, case["grad_norm_before_clipping"])):
        if abs(ours - recorded) > RHO * abs(recorded):
            failures[what] = f"{ours} against {recorded}"
    before, after = case["state_before"], case["state_after"]
    assert sorted(step.state_after) == sorted(after)
    params = set(step.parameters)
    sgd = "momentum" in case["hyper"]
    lr = max(case["group_lrs"])
    recorded_opt = case["optimizer_state_after"]
    # The norm of every gradient the optimizer stepped with (clipped): bounds the noise of a
    # gradient that is zero in exact arithmetic.
    clipped_norm = min(case["grad_norm_before_clipping"], 10.0)
    zero_noise = EPS32 * clipped_norm
    for k, rec_after in after.items():
        ours_after, rec_before = step.state_after[k], before[k]
        if k not in params:
            why = _buffer(k, ours_after, before, after)
            if why:
                failures[k] = why
            continue
        d_rec = rec_after.double() - rec_before.double()
        d_ours = ours_after.double() - rec_before.double()
        rounding = ulp(rec_after)
        if k not in recorded_opt or (sgd and k.endswith(".bin")):  # never optimized: stands still
            why = _outside(d_ours, d_rec, rounding)
        elif k in noise_params:
            why = _noise_parameter(case, k, step, zero_noise, lr, sgd, failures)
        else:
            why = _stepped_parameter(case, k, step, d_ours, d_rec, lr, sgd, failures)
        if why:
            failures[k] = why
    if not sgd:  # every parameter stepped once more, the unselected branches' too
        for k, state in recorded_opt.items():
            ours = step.optimizer_after.get(k, {}).get("step")
            if ours is None or float(ours) != float(state["step"]):
                ours = None if ours is None else float(ours)
                failures[f"{k}.step"] = f"{ours} against {float(state['step'])}"
    return failures


def _stepped_parameter(case: dict, k: str, step, d_ours, d_rec, lr: float, sgd: bool,
                       failures: dict) -> str | None:
    g, recovery = recorded_gradient(case, k)
    noise = RHO * g.abs().max().item() + recovery
    rec_opt_before, rec_opt = case["optimizer_state_before"][k], case["optimizer_state_after"][k]
    ours_opt = step.optimizer_after.get(k, {})
    if sgd:
        mu = case["hyper"]["momentum"]
        tol = lr * (1 + mu) * noise + 4 * EPS32 * d_rec.abs() + ulp(case["state_after"][k])
        checks = {"momentum_buffer": noise + 2 * ulp(rec_opt["momentum_buffer"])}
    else:
        b1, b2 = ADAM_BETAS
        t = int(rec_opt["step"])
        sens = adam_sensitivity(lr, t, rec_opt["exp_avg"].double(), rec_opt_before["exp_avg_sq"].double(),
                                g, noise)
        tol = sens * noise + 4 * EPS32 * d_rec.abs() + ulp(case["state_after"][k])
        checks = {"exp_avg": (1 - b1) * noise + 2 * ulp(rec_opt["exp_avg"]),
                  "exp_avg_sq": (1 - b2) * (2 * g.abs() + noise) * noise + 2 * ulp(rec_opt["exp_avg_sq"])}
    for key, key_tol in checks.items():
        if key not in ours_opt:
            failures[f"{k}.{key}"] = "not in our optimizer's state (not stepped)"
            continue
        why = _outside(ours_opt[key], rec_opt[key], key_tol)
        if why:
            failures[f"{k}.{key}"] = why
    return _outside(d_ours, d_rec, tol)


def _noise_parameter(case: dict, k: str, step, bound: float, lr: float, sgd: bool,
                     failures: dict) -> str | None:
    """A parameter whose gradient is zero in exact arithmetic: both gradients below ``bound``; the
    update and the optimizer state within what such a gradient gives from the recorded state."""
    g, recovery = recorded_gradient(case, k)
    ours_g = step.grads.get(k)
    if g.abs().max().item() > bound + recovery.max().item():
        failures[f"{k}.recorded_grad"] = f"|g| {g.abs().max().item():.3g} above the noise bound {bound:.3g}"
    if ours_g is None or ours_g.abs().max().item() > bound:
        failures[f"{k}.grad"] = ("no gradient" if ours_g is None else
                                 f"|g| {ours_g.abs().max().item():.3g} above the noise bound {bound:.3g}")
    rec_before, rec_opt_before, rec_opt = (case["state_before"][k], case["optimizer_state_before"][k],
                                           case["optimizer_state_after"][k])
    ours_opt = step.optimizer_after.get(k, {})
    lo_g, hi_g = torch.full_like(g, -bound), torch.full_like(g, bound)
    ours_d = step.state_after[k].double() - rec_before.double()
    rec_d = case["state_after"][k].double() - rec_before.double()
    slack = 4 * EPS32 * rec_d.abs() + ulp(case["state_after"][k])
    if sgd:
        mu = case["hyper"]["momentum"]
        b0 = rec_opt_before["momentum_buffer"].double()
        states = {"momentum_buffer": (mu * b0 + lo_g, mu * b0 + hi_g, 2 * ulp(rec_opt["momentum_buffer"]))}
        # -lr * (g + mu * (mu * b0 + g)), at lr or at 0 (a group the reference does not train)
        ends = [-rate * ((1 + mu) * e + mu * mu * b0) for rate in (lr, 0.0) for e in (lo_g, hi_g)]
    else:
        b1, b2 = ADAM_BETAS
        t = int(rec_opt["step"])
        m0, v0 = rec_opt_before["exp_avg"].double(), rec_opt_before["exp_avg_sq"].double()
        states = {"exp_avg": (b1 * m0 + (1 - b1) * lo_g, b1 * m0 + (1 - b1) * hi_g,
                              2 * ulp(rec_opt["exp_avg"])),
                  "exp_avg_sq": (b2 * v0, b2 * v0 + (1 - b2) * bound**2, 2 * ulp(rec_opt["exp_avg_sq"]))}
        # The update over |g| <= bound: its extremes lie at the ends or where its derivative
        # vanishes (g = (1-b1) b2 v0 / (b1 m0 (1-b2)), ignoring eps); evaluated at all three.
        safe_m0 = torch.where(m0 != 0, m0, torch.ones_like(m0))
        crit = torch.where(m0 != 0, (1 - b1) * b2 * v0 / (b1 * safe_m0 * (1 - b2)), 0.0).clamp(-bound, bound)
        ends = [_adam_update(lr, t, m0, v0, e) for e in (lo_g, hi_g, crit)]
    for key, (low, high, key_slack) in states.items():
        for who, value in (("ours", ours_opt.get(key)), ("recorded", rec_opt[key])):
            if value is None:
                failures[f"{k}.{key}"] = "not in our optimizer's state (not stepped)"
                continue
            why = _within(value, low, high, key_slack)
            if why:
                failures[f"{k}.{key}"] = f"{who}: {why}"
    low, high = torch.stack(ends).min(0).values, torch.stack(ends).max(0).values
    for who, d in (("ours", ours_d), ("recorded", rec_d)):
        why = _within(d, low, high, slack)
        if why:
            return f"{who}: {why}"
    return None


def _adam_update(lr: float, t: int, m0: torch.Tensor, v0: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    b1, b2 = ADAM_BETAS
    m, v = b1 * m0 + (1 - b1) * g, b2 * v0 + (1 - b2) * g * g
    return -lr / (1 - b1**t) * m / (torch.sqrt(v / (1 - b2**t)) + ADAM_EPS)

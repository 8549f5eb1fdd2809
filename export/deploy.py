"""The searched subnet as a deployable model: one path, no supernet, integer weight codes.

``deploy(supernet, selection)`` keeps only the selected branch of every searchable layer and gives
a plain ``nn.Module`` whose ``forward(x)`` computes, in evaluation, what ``supernet(x, selection)``
computes: the same operations in the same order up to the last quantizer (a quantizer turns a
last-bit difference into a whole level, so nothing before one is re-associated). Its quantizers
stay explicit modules with fixed steps, and each quantized convolution holds its weights as int8
codes with one step per output channel (packed at their bits in its state dict). The one fold:
where the last unit's BN_last meets the global average pool and the classifier (MobileNet-v2), the
three become one linear layer (an affine commutes with an average), exact up to float rounding
after the last quantizer.

``DeployedNet.describe()`` gives the configuration that rebuilds the module (``from_description``)
from a state dict; ``save`` writes ``{"config", "state_dict"}``, which ``torch.load(weights_only=True)``
reads and ``DeployedNet.load`` rebuilds.
"""

import copy
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.skip import FlexibleSkip
from models.supernet import Supernet
from models.units import unit_formula
from quant import ClipActivation, LsqActivation, QConv
from quant.functional import clip_codes, clip_range, lsq_codes, lsq_scale, lsq_step, values_key
from utils.checkpoint import save_file

from .packing import pack_codes, unpack_codes


class ClipQuant(nn.Module):
    """The clip quantizer with its clip fixed: ``round(clamp(x, 0, upper) / delta) * delta``."""

    def __init__(self, upper: torch.Tensor, delta: torch.Tensor, bits: int):
        super().__init__()
        self.bits = bits
        self.register_buffer("upper", upper.detach().clone().reshape(()))
        self.register_buffer("delta", delta.detach().clone().reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return clip_codes(x, self.upper, self.delta).mul_(self.delta)

    def levels(self) -> int:
        """The highest level: ``round(upper / delta)``, ``2**bits - 1`` for a clip above 0."""
        return int(torch.round(self.upper / self.delta))


class LsqQuant(nn.Module):
    """The LSQ activation quantizer with its steps fixed: ``round(clamp(x / step, 0, qmax)) * step``
    per input channel."""

    def __init__(self, step: torch.Tensor, bits: int):
        super().__init__()
        self.bits, self.qmax = bits, 2**bits - 1
        self.register_buffer("step", step.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.step.view(1, -1, 1, 1)
        return lsq_codes(x / a, 0, self.qmax).mul_(a)

    def levels(self) -> int:
        return self.qmax


class QuantizedConv(nn.Module):
    """A convolution whose weights are int8 ``codes`` times a per-output-channel ``scale``.

    Its state dict holds the codes packed at ``bits`` bits (``export.packing``: four 2-bit codes a
    byte, a flat uint8 tensor); loading one unpacks them.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bits: int, stride: int, groups: int):
        super().__init__()
        self.bits, self.stride, self.groups = bits, stride, groups
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scale", scale.detach().clone())
        self._kept: tuple | None = None  # (key, weight): the float weight until codes or scale change

    def weight(self) -> torch.Tensor:
        key = values_key(self.codes, self.scale)
        if key is None or self._kept is None or self._kept[0] != key:
            self._kept = key, self.codes.float() * self.scale.view(-1, 1, 1, 1)
        return self._kept[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight(), None, self.stride, self.codes.shape[-1] // 2, 1, self.groups)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "codes"] = pack_codes(self.codes, self.bits)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        key = prefix + "codes"
        if key in state_dict:  # load_state_dict passes its own copy of the dict: replaced in place
            state_dict[key] = unpack_codes(state_dict[key], self.bits, self.codes.shape)
        super()._load_from_state_dict(state_dict, prefix, *args)


class DeployedUnit(nn.Module):
    """``BN_last(ReLU(BN_post(conv(Q(BN_pre(x))))) + Skip(x))`` of one branch; ``bn_last`` is the
    identity where it was folded into the classifier."""

    def __init__(
        self,
        bn_pre: nn.Module,
        quant: nn.Module,
        conv: QuantizedConv,
        bn_post: nn.Module,
        skip: FlexibleSkip,
        bn_last: nn.Module,
    ):
        super().__init__()
        self.bn_pre, self.quant, self.conv, self.bn_post, self.skip, self.bn_last = (
            bn_pre,
            quant,
            conv,
            bn_post,
            skip,
            bn_last,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unit_formula(x, self.bn_pre, self.quant, self.conv, self.bn_post, self.skip, self.bn_last)


class DeployedBlock(nn.Module):
    """Units one after the other, plus the block's residual (a ``FlexibleSkip``) where it has one."""

    def __init__(self, units: list[DeployedUnit], shortcut: FlexibleSkip | None):
        super().__init__()
        self.units = nn.ModuleList(units)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for unit in self.units:
            out = unit(out)
        return out + self.shortcut(x) if self.shortcut is not None else out


class DeployedNet(nn.Module):
    """Stem (full precision), blocks, global average pool, classifier (full precision)."""

    def __init__(self, stem: nn.Module, blocks: list[DeployedBlock], classifier: nn.Linear, source: dict):
        super().__init__()
        self.stem, self.blocks, self.classifier = stem, nn.ModuleList(blocks), classifier
        self.source = source  # the supernet's config and the selection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(x.mean((2, 3)))

    def units(self) -> list[DeployedUnit]:
        return [unit for block in self.blocks for unit in block.units]

    def describe(self) -> dict[str, Any]:
        """What ``from_description`` needs, besides the state dict: the layout of every part."""

        def bn(m: nn.Module) -> int | None:
            return m.num_features if isinstance(m, nn.BatchNorm2d) else None

        def quant(m: nn.Module) -> dict:
            if isinstance(m, ClipQuant):
                return {"kind": "clip", "bits": m.bits}
            if isinstance(m, LsqQuant):
                return {"kind": "lsq", "bits": m.bits, "channels": m.step.numel()}
            return {"kind": "none"}

        stem = self.stem
        return {
            "source": self.source,
            "stem": {
                "in": stem.conv1.in_channels,
                "out": stem.conv1.out_channels,
                "kernel": stem.conv1.kernel_size[0],
                "stride": stem.conv1.stride[0],
                "maxpool": isinstance(getattr(stem, "maxpool", None), nn.MaxPool2d),
            },
            "blocks": [
                {
                    "shortcut": None
                    if b.shortcut is None
                    else [b.shortcut.in_channels, b.shortcut.out_channels, b.shortcut.stride],
                    "units": [
                        {
                            "bn_pre": bn(u.bn_pre),
                            "quant": quant(u.quant),
                            "conv": {
                                "shape": list(u.conv.codes.shape),
                                "bits": u.conv.bits,
                                "stride": u.conv.stride,
                                "groups": u.conv.groups,
                            },
                            "bn_post": bn(u.bn_post),
                            "skip": [u.skip.in_channels, u.skip.out_channels, u.skip.stride],
                            "bn_last": bn(u.bn_last),
                        }
                        for u in b.units
                    ],
                }
                for b in self.blocks
            ],
            "classifier": [self.classifier.in_features, self.classifier.out_features],
        }

    def save(self, path: str | os.PathLike) -> None:
        """``{"config": describe(), "state_dict"}`` to ``path`` (codes packed at their bits)."""
        save_file({"config": self.describe(), "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DeployedNet":
        """A model ``04export.py`` wrote (``arch{i}.pt``: ``{"config", "state_dict"}``), in evaluation."""
        saved = torch.load(path, map_location="cpu", weights_only=True)
        net = cls.from_description(saved["config"])
        net.load_state_dict(saved["state_dict"])
        return net.eval()

    @classmethod
    def from_description(cls, description: dict) -> "DeployedNet":
        """An empty model of ``describe()``'s layout, to ``load_state_dict`` into."""
        s = description["stem"]
        stem = _Stem(
            nn.Conv2d(s["in"], s["out"], s["kernel"], s["stride"], s["kernel"] // 2, bias=False),
            nn.BatchNorm2d(s["out"]),
            nn.MaxPool2d(3, 2, 1) if s["maxpool"] else nn.Identity(),
        )

        def bn(features: int | None) -> nn.Module:
            return nn.BatchNorm2d(features) if features else nn.Identity()

        def quant(q: dict) -> nn.Module:
            if q["kind"] == "clip":
                return ClipQuant(torch.tensor(1.0), torch.tensor(1.0), q["bits"])
            if q["kind"] == "lsq":
                return LsqQuant(torch.ones(q["channels"]), q["bits"])
            return nn.Identity()

        blocks = []
        for b in description["blocks"]:
            units = [
                DeployedUnit(
                    bn(u["bn_pre"]),
                    quant(u["quant"]),
                    QuantizedConv(
                        torch.zeros(u["conv"]["shape"], dtype=torch.int8),
                        torch.ones(u["conv"]["shape"][0]),
                        u["conv"]["bits"],
                        u["conv"]["stride"],
                        u["conv"]["groups"],
                    ),
                    bn(u["bn_post"]),
                    FlexibleSkip(*u["skip"]),
                    bn(u["bn_last"]),
                )
                for u in b["units"]
            ]
            blocks.append(DeployedBlock(units, FlexibleSkip(*b["shortcut"]) if b["shortcut"] else None))
        net = cls(stem, blocks, nn.Linear(*description["classifier"]), description["source"])
        return net.eval()


class _Stem(nn.Module):
    """The full-precision stem: convolution, BatchNorm, ReLU, and the ResNet's max-pool."""

    def __init__(self, conv1: nn.Conv2d, bn1: nn.BatchNorm2d, maxpool: nn.Module):
        super().__init__()
        self.conv1, self.bn1, self.maxpool = conv1, bn1, maxpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(F.relu(self.bn1(self.conv1(x))))


def _quant(quantizer: nn.Module, input_numel: int) -> nn.Module:
    """A unit's activation quantizer with its steps as evaluation uses them: the clip's range, or
    LSQ's reference step value for an input of ``input_numel`` values (``lsq_step``)."""
    if isinstance(quantizer, ClipActivation):
        if not quantizer.quantize:
            return nn.Identity()
        upper, delta = clip_range(quantizer.upper_bound.detach(), quantizer.bin.detach())
        return ClipQuant(upper, delta, quantizer.bits)
    if isinstance(quantizer, LsqActivation):
        return LsqQuant(lsq_step(quantizer.steps(), lsq_scale(input_numel, quantizer.qp)), quantizer.bits)
    return nn.Identity()


def _conv(conv: QConv) -> QuantizedConv:
    """The convolution's quantized weights as int8 codes and steps (those ``QConv`` multiplies)."""
    if not conv.quantize_weights:
        raise ValueError("weight quantization is off: deploy a supernet after change_precision(True, True)")
    w = conv.weight.detach()
    q = conv.w_quantize
    a = lsq_step(q.s, lsq_scale(w.numel(), q.qp)).view(-1, 1, 1, 1)
    codes = lsq_codes(w / a, -q.qp, q.qp)
    return QuantizedConv(codes, a.flatten(), q.bits, conv.stride, conv.groups)


def deploy(supernet: Supernet, selection: list[int], batch_size: int, resolution: int) -> DeployedNet:
    """The single-path model of ``selection``, in evaluation.

    LSQ's step depends, in its last bit, on the size of the tensor it quantizes (SPEC section 1);
    the deployed steps are those of a batch of ``batch_size`` images of ``resolution`` pixels (use
    the piece the supernet is evaluated in, ``--val_batch_size`` over ``--replicas`` (SPEC 5a), to
    get its outputs exactly).
    """
    if supernet.quantizer == "float":
        raise ValueError("a full-precision supernet (--quantizer float) has no quantizers to deploy")
    supernet = copy.deepcopy(supernet).eval()
    selection = supernet.check_selection(selection)
    numels = _quantizer_inputs(supernet, selection, batch_size, resolution)

    def unit(parts: tuple) -> DeployedUnit:
        bn_pre, quantizer, conv, bn_post, skip, bn_last = parts
        return DeployedUnit(bn_pre, _quant(quantizer, numels.get(id(quantizer), 0)), _conv(conv), bn_post,
                            skip, bn_last)

    path = supernet.path(selection)
    blocks = [DeployedBlock([unit(p) for p in block.units], block.shortcut) for block in path.blocks]
    classifier = copy.deepcopy(path.classifier)
    last = blocks[-1]
    if last.shortcut is None and isinstance(last.units[-1].bn_last, nn.BatchNorm2d):
        # the last BN_last meets the average pool and the classifier: the three become one layer
        classifier = _fold_into_classifier(last.units[-1].bn_last, classifier)
        last.units[-1].bn_last = nn.Identity()
    source = {
        "config": dict(supernet.config),
        "selection": list(selection),
        "batch_size": batch_size,
        "resolution": resolution,
    }
    return DeployedNet(_Stem(*path.stem), blocks, classifier, source).eval()


def _quantizer_inputs(
    supernet: Supernet, selection: list[int], batch_size: int, resolution: int
) -> dict[int, int]:
    """How many values each LSQ activation quantizer of ``selection`` quantizes in a batch (by the
    id of the quantizer), from one pass of a single image."""
    sizes, handles = {}, []
    for m in supernet.modules():
        if isinstance(m, LsqActivation):
            handles.append(
                m.register_forward_pre_hook(
                    lambda module, args: sizes.__setitem__(id(module), args[0][0].numel() * batch_size)
                )
            )
    try:
        with torch.no_grad():
            supernet(torch.zeros(1, 3, resolution, resolution), selection)
    finally:
        for h in handles:
            h.remove()
    return sizes


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``bn`` in evaluation as ``x * scale + shift`` per channel."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias.detach() - bn.running_mean * scale


def _fold_into_classifier(bn: nn.BatchNorm2d, linear: nn.Linear) -> nn.Linear:
    """``linear(mean(bn(x)))`` as one linear layer of ``mean(x)``: ``bn`` in evaluation is a
    per-channel affine, which commutes with the average."""
    scale, shift = bn_affine(bn)
    folded = nn.Linear(linear.in_features, linear.out_features)
    with torch.no_grad():
        folded.weight.copy_(linear.weight * scale)
        folded.bias.copy_(linear.bias + linear.weight @ shift)
    return folded


def size_report(net: DeployedNet, files: Sequence[str | os.PathLike] = ()) -> dict[str, Any]:
    """Per layer and in total: the bits of weights and of the activations a layer takes, and the
    bytes of its weights packed at those bits (the per-channel steps as float32) against float32.
    The full-precision stem and classifier count as float32; ``other`` counts the BatchNorms and the
    activation quantizers' steps, float32 in both. ``files``: the model's files, whose bytes on
    disk the report gives beside those totals."""
    layers = [
        {
            "layer": "stem",
            "weights": net.stem.conv1.weight.numel(),
            "weight_bits": 32,
            "activation_bits": 32,
            "bytes": 4 * net.stem.conv1.weight.numel(),
        }
    ]
    for i, unit in enumerate(net.units()):
        conv = unit.conv
        activation_bits = unit.quant.bits if isinstance(unit.quant, (ClipQuant, LsqQuant)) else 32
        layers.append(
            {
                "layer": f"unit{i}",
                "weights": conv.codes.numel(),
                "weight_bits": conv.bits,
                "activation_bits": activation_bits,
                "kernel": list(conv.codes.shape),
                "bytes": -(-conv.codes.numel() * conv.bits // 8) + 4 * conv.scale.numel(),
            }
        )
    fc = net.classifier
    layers.append(
        {
            "layer": "classifier",
            "weights": fc.weight.numel() + fc.bias.numel(),
            "weight_bits": 32,
            "activation_bits": 32,
            "bytes": 4 * (fc.weight.numel() + fc.bias.numel()),
        }
    )
    for layer in layers:
        layer["float32_bytes"] = 4 * layer["weights"]
    other = 4 * sum(
        t.numel()
        for name, t in net.state_dict().items()
        if not name.endswith(("codes", "conv.scale", "conv1.weight"))
        and not name.startswith("classifier")
        and t.is_floating_point()
    )
    packed = sum(layer["bytes"] for layer in layers)
    full = sum(layer["float32_bytes"] for layer in layers)
    return {
        "layers": layers,
        "other_bytes": other,
        "weights_bytes": packed,
        "weights_float32_bytes": full,
        "total_bytes": packed + other,
        "total_float32_bytes": full + other,
        "compression": (full + other) / (packed + other),
        "files": {str(f): os.path.getsize(f) for f in files},
    }

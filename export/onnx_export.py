"""A ``DeployedNet`` as an ONNX graph of standard operators, every quantizer written out.

Codes are stored at the smallest integer type the opset has (``--opset``): from opset 25 ``INT2``
and ``UINT2``, from 21 ``INT4``/``UINT4``, before that 8 bits. Quantized weights are code
initializers through a per-output-channel ``DequantizeLinear`` (``axis=0``). Activation quantizers
are ``QuantizeLinear`` / ``DequantizeLinear`` pairs, zero point 0: the clip quantizer one scale
``delta``, LSQ one scale per channel (``axis=1``). Where the type's range is the quantizer's
(``2**b - 1`` levels in a ``b``-bit type) its saturation is the quantizer's clamp and nothing else
is written; where it is wider (3 bits in ``UINT4``, any code in uint8, a clip whose ``bin`` gives
other levels) the quantizer's clamp comes first in float (``Clip`` to ``[0, c]``; LSQ ``Min`` with
``qmax * step``, which rounds to ``qmax``). The stem and the classifier stay float, as in the method.
The graph takes the normalised float32 images the PyTorch model takes (``utils.data.to_device``).

``fold=True`` writes a graph for speed, not bit-exactness: each unit's BN_post becomes the weights'
per-channel scale and a convolution bias (the codes unchanged), the stem's BatchNorm its
convolution's weights and bias. The quantizers' inputs then differ in the last bits, which can move
an activation on a rounding boundary to the next level: the export measures the top-1 agreement.
"""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from models.skip import FlexibleSkip

from .deploy import ClipQuant, DeployedNet, DeployedUnit, LsqQuant, bn_affine
from .packing import pack_codes

OPSET = 25  # INT2 / UINT2
MIN_OPSET = 13  # per-axis QuantizeLinear
# (first opset, bits, type) of the code types, smallest first.
_SIGNED = ((25, 2, TensorProto.INT2), (21, 4, TensorProto.INT4), (MIN_OPSET, 8, TensorProto.INT8))
_UNSIGNED = ((25, 2, TensorProto.UINT2), (21, 4, TensorProto.UINT4), (MIN_OPSET, 8, TensorProto.UINT8))


def code_type(bits: int, opset: int, types: tuple = _SIGNED) -> tuple[int, int]:
    """The bits and ONNX type of the smallest code type of ``opset`` that holds ``bits``-bit codes."""
    return next((b, t) for since, b, t in types if opset >= since and b >= bits)


class _Graph:
    def __init__(self, opset: int, fold: bool):
        self.opset, self.fold = opset, fold
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, hint: str, value: torch.Tensor | np.ndarray) -> str:
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def codes(self, hint: str, values: torch.Tensor, bits: int, onnx_type: int) -> str:
        """An integer initializer of ``onnx_type``, packed at ``bits`` bits (its layout)."""
        name = self.name(hint)
        raw = pack_codes(values, bits).numpy().tobytes()
        self.initializers.append(helper.make_tensor(name, onnx_type, list(values.shape), raw, raw=True))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def batch_norm(self, x: str, bn: nn.Module) -> str:
        if not isinstance(bn, nn.BatchNorm2d):
            return x
        return self.op(
            "BatchNormalization",
            [
                x,
                self.const("bn_scale", bn.weight),
                self.const("bn_bias", bn.bias),
                self.const("bn_mean", bn.running_mean),
                self.const("bn_var", bn.running_var),
            ],
            epsilon=bn.eps,
        )

    def quantize(self, x: str, quant: nn.Module) -> str:
        if not isinstance(quant, (ClipQuant, LsqQuant)):
            return x
        levels = quant.levels()
        bits, onnx_type = code_type(levels.bit_length(), self.opset, _UNSIGNED)
        clip = isinstance(quant, ClipQuant)
        if levels < 2**bits - 1:  # the type saturates above the top level: the quantizer's clamp first
            if clip:
                lo = self.const("clip_lo", np.array(0, np.float32))
                x = self.op("Clip", [x, lo, self.const("clip_hi", quant.upper)])
            else:
                x = self.op("Min", [x, self.const("code_hi", (quant.qmax * quant.step).view(1, -1, 1, 1))])
        step = quant.delta if clip else quant.step
        scale = self.const("act_scale", step)
        zero = self.codes("act_zero", torch.zeros(step.shape, dtype=torch.int8), bits, onnx_type)
        axis = {} if clip else {"axis": 1}
        q = self.op("QuantizeLinear", [x, scale, zero], "act_codes", **axis)
        return self.op("DequantizeLinear", [q, scale, zero], **axis)

    def skip(self, x: str, skip: FlexibleSkip) -> str:
        cin, cout = skip.in_channels, skip.out_channels
        if cout > cin:
            repeats = -(-cout // cin)
            x = self.op("Concat", [x] * repeats, axis=1)
            if repeats * cin != cout:
                x = self.op(
                    "Slice",
                    [
                        x,
                        self.const("starts", np.array([0])),
                        self.const("ends", np.array([cout])),
                        self.const("axes", np.array([1])),
                    ],
                )
        elif cin > cout:
            pad = -cin % cout
            if pad:
                x = self.op("Pad", [x, self.const("pads", np.array([0, 0, 0, 0, 0, pad, 0, 0]))])
            parts = [self.name("chunk") for _ in range((cin + pad) // cout)]
            self.nodes.append(
                helper.make_node(
                    "Split", [x, self.const("split", np.array([cout] * len(parts)))], parts, axis=1
                )
            )
            x = self.op("Sum", parts)
        if skip.stride > 1:
            x = self.op(
                "AveragePool",
                [x],
                kernel_shape=[skip.stride] * 2,
                strides=[skip.stride] * 2,
                ceil_mode=1,
                count_include_pad=0,
            )
        return x

    def unit(self, x: str, unit: DeployedUnit) -> str:
        q = self.quantize(self.batch_norm(x, unit.bn_pre), unit.quant)
        conv, bn_post = unit.conv, unit.bn_post
        scale, bias = conv.scale, []
        if self.fold and isinstance(bn_post, nn.BatchNorm2d):  # BN_post into the weights' scale
            a, b = bn_affine(bn_post)
            scale, bias, bn_post = scale * a, [self.const("conv_bias", b)], None
        bits, onnx_type = code_type(conv.bits, self.opset)
        weight = self.op(
            "DequantizeLinear",
            [self.codes("weight_codes", conv.codes, bits, onnx_type), self.const("weight_scale", scale)],
            "weight",
            axis=0,
        )
        k = conv.codes.shape[-1]
        z = self.op(
            "Conv", [q, weight, *bias], strides=[conv.stride] * 2, pads=[k // 2] * 4, group=conv.groups
        )
        out = self.op("Add", [self.op("Relu", [self.batch_norm(z, bn_post)]), self.skip(x, unit.skip)])
        return self.batch_norm(out, unit.bn_last)

    def stem(self, stem: nn.Module) -> str:
        conv, bn = stem.conv1, stem.bn1
        weight, bias = conv.weight.detach(), []
        if self.fold:  # the BatchNorm into the convolution
            a, b = bn_affine(bn)
            weight, bias, bn = weight * a.view(-1, 1, 1, 1), [self.const("stem_bias", b)], None
        x = self.op(
            "Conv",
            ["images", self.const("stem_weight", weight), *bias],
            strides=list(conv.stride),
            pads=[conv.padding[0]] * 4,
        )
        x = self.op("Relu", [self.batch_norm(x, bn)])
        if isinstance(stem.maxpool, nn.MaxPool2d):
            x = self.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
        return x


def to_onnx(net: DeployedNet, path: str | Path, opset: int = OPSET, fold: bool = False) -> onnx.ModelProto:
    """Write ``net`` (in evaluation) as ONNX of ``opset`` to ``path``; returns the model, checked by
    ``onnx.checker``. ``fold``: the graph for speed (module docstring)."""
    if not MIN_OPSET <= opset <= OPSET:
        raise ValueError(f"opset {opset}: the export writes opsets {MIN_OPSET} to {OPSET}")
    g = _Graph(opset, fold)
    x = g.stem(net.stem)
    for block in net.blocks:
        out = x
        for unit in block.units:
            out = g.unit(out, unit)
        x = g.op("Add", [out, g.skip(x, block.shortcut)]) if block.shortcut is not None else out
    pooled = g.op("Flatten", [g.op("GlobalAveragePool", [x])])
    g.nodes.append(
        helper.make_node(
            "Gemm",
            [pooled, g.const("fc_weight", net.classifier.weight), g.const("fc_bias", net.classifier.bias)],
            ["logits"],
            transB=1,
        )
    )
    classes = net.classifier.out_features
    graph = helper.make_graph(
        g.nodes,
        "basq",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        g.initializers,
    )
    # The IR version of the opset, not the newest: a runtime that reads the opset reads the file.
    model = helper.make_model_gen_version(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="basq"
    )
    onnx.checker.check_model(model, full_check=True)
    Path(path).write_bytes(model.SerializeToString())
    return model


# onnxruntime's settings the export checks and the benchmark measures: graph optimisations off; all
# (its default); all with the weights dequantized once, at load.
ORT_SETTINGS = {"off": (False, False), "all": (True, False), "all, weights at load": (True, True)}


def ort_session(
    path: str | Path,
    optimise: bool = True,
    weights_at_load: bool = False,
    threads: int = 0,
    arena: bool = True,
) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session of ``path``: every graph optimisation (onnxruntime's default) or
    none; ``threads`` 0 lets onnxruntime choose; ``arena=False`` returns activations' memory after
    each run (several sessions at a large batch otherwise each keep theirs).

    By default onnxruntime keeps a constant weight's ``DequantizeLinear`` for its QDQ fusions (a
    ``DequantizeLinear -> Conv -> QuantizeLinear`` group becomes an integer convolution; no group of
    ours ends in a ``QuantizeLinear``) and dequantizes the codes at every run. ``weights_at_load``
    turns those fusions off (``session.disable_quant_qdq``): constant folding then dequantizes the
    weights once, at load, and fuses the convolutions with what follows.
    """
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = (
        onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimise
        else onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = arena
    if weights_at_load:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

"""A ``DeployedNet`` as an ONNX graph of standard operators, every quantizer written out.

Activation quantizers become ``QuantizeLinear`` / ``DequantizeLinear`` pairs (uint8, zero point 0):
the clip quantizer a ``Clip`` to ``[0, c]`` then one scale ``delta``; LSQ one scale per channel
(``axis=1``) and a ``Clip`` of the codes to ``[0, qmax]`` where that is narrower than uint8. Quantized
weights are int8 initializers (the codes) through a per-output-channel ``DequantizeLinear``
(``axis=0``). The stem and the classifier stay float, as in the method. The graph takes the
normalised float32 images the PyTorch model takes (``utils.data.to_device``).
"""

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from models.skip import FlexibleSkip

from .deploy import ClipQuant, DeployedNet, DeployedUnit, LsqQuant

OPSET = 17


class _Graph:
    def __init__(self):
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
        if isinstance(quant, ClipQuant):
            x = self.op(
                "Clip",
                [x, self.const("clip_lo", np.array(0, np.float32)), self.const("clip_hi", quant.upper)],
            )
            scale, zero = self.const("act_scale", quant.delta), self.const("act_zero", np.array(0, np.uint8))
            q = self.op("QuantizeLinear", [x, scale, zero], "act_codes")
            return self.op("DequantizeLinear", [q, scale, zero])
        if isinstance(quant, LsqQuant):
            scale = self.const("act_scale", quant.step)
            zero = self.const("act_zero", np.zeros(quant.step.numel(), np.uint8))
            q = self.op("QuantizeLinear", [x, scale, zero], "act_codes", axis=1)
            if quant.qmax < 255:
                q = self.op(
                    "Clip",
                    [
                        q,
                        self.const("code_lo", np.array(0, np.uint8)),
                        self.const("code_hi", np.array(quant.qmax, np.uint8)),
                    ],
                )
            return self.op("DequantizeLinear", [q, scale, zero], axis=1)
        return x

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
        conv = unit.conv
        weight = self.op(
            "DequantizeLinear",
            [
                self.const("weight_codes", conv.codes),
                self.const("weight_scale", conv.scale),
                self.const("weight_zero", np.zeros(conv.scale.numel(), np.int8)),
            ],
            "weight",
            axis=0,
        )
        k = conv.codes.shape[-1]
        z = self.op("Conv", [q, weight], strides=[conv.stride] * 2, pads=[k // 2] * 4, group=conv.groups)
        out = self.op("Add", [self.op("Relu", [self.batch_norm(z, unit.bn_post)]), self.skip(x, unit.skip)])
        return self.batch_norm(out, unit.bn_last)


def to_onnx(net: DeployedNet, path: str | Path) -> onnx.ModelProto:
    """Write ``net`` (in evaluation) as ONNX to ``path``; returns the model, checked by ``onnx.checker``."""
    g = _Graph()
    stem = net.stem
    x = g.op(
        "Conv",
        ["images", g.const("stem_weight", stem.conv1.weight)],
        strides=list(stem.conv1.stride),
        pads=[stem.conv1.padding[0]] * 4,
    )
    x = g.op("Relu", [g.batch_norm(x, stem.bn1)])
    if isinstance(stem.maxpool, nn.MaxPool2d):
        x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
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
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="basq")
    onnx.checker.check_model(model)
    Path(path).write_bytes(model.SerializeToString())
    return model

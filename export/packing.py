"""Integer codes stored at their bits: ``bits``-bit two's complement fields, one after the other in
a little-endian bit stream (the first code in the lowest bits of the first byte: four 2-bit codes a
byte). At 2 and 4 bits this is the layout of ONNX's ``INT2``/``INT4`` tensors, so one packing
serves the standalone model's file and the ONNX initializers."""

import torch


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` (integers in ``[-2**(bits-1), 2**(bits-1))``) as a flat uint8 tensor of
    ``ceil(numel * bits / 8)`` bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"{bits}-bit codes: packing takes 1 to 8 bits")
    fields = codes.reshape(-1).to(torch.int64) & (2**bits - 1)
    stream = (fields.unsqueeze(1) >> torch.arange(bits)) & 1  # each code's bits, lowest first
    stream = torch.nn.functional.pad(stream.reshape(-1), (0, -stream.numel() % 8))
    return (stream.view(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape: torch.Size | list[int]) -> torch.Tensor:
    """The int8 codes of ``shape`` that ``pack_codes`` stored in ``packed``."""
    numel = int(torch.Size(shape).numel())
    if packed.dtype != torch.uint8 or packed.numel() != -(-numel * bits // 8):
        raise ValueError(
            f"{packed.numel()} {packed.dtype} bytes do not hold {numel} codes of {bits} bits"
        )
    stream = (packed.to(torch.int64).unsqueeze(1) >> torch.arange(8)) & 1
    fields = (stream.reshape(-1)[: numel * bits].view(numel, bits) << torch.arange(bits)).sum(1)
    signed = fields - ((fields >> (bits - 1)) << bits)  # two's complement: the top bit counts -2**(bits-1)
    return signed.to(torch.int8).reshape(shape)

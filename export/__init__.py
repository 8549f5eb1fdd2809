"""The deployable model of a searched arch: the standalone single-path network (``deploy``), its
ONNX graph (``onnx_export``). It uses ``models``; nothing in ``models`` uses it."""

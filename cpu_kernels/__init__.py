"""BASQ's CPU back end: fused C kernels (``kernels.c``) that give PyTorch's values bit for bit.

``library`` builds the kernels with the machine's C compiler at first use and runs each
once-per-process check; the rest wraps them for their two callers, each with one way in:

- ``quantizers``: the clip and LSQ quantizers in one pass, for ``quant.functional`` (imports only
  ``library``, so that ``quant`` can import it);
- ``units``: a unit of the supernets, for ``models.units``, through ``eval_unit`` (a unit in
  evaluation as two passes) and ``train_batch_norm`` (training-mode BatchNorm with what follows it,
  described by ``after``). These build on ``quant``'s quantizers.

Both return to PyTorch's ops wherever the kernels do not apply: a GPU, other dtypes or layouts,
``BASQ_NATIVE=0``, no compiler, or a machine whose PyTorch rounds BatchNorm otherwise. Nothing here
imports ``models`` or ``utils``.
"""

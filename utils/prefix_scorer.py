"""Scoring many selections on the same batches, sharing the work of common prefixes (stage 2).

The evolution's children share most genes with their parents, and the output of a supernet stage
depends only on the genes up to that stage (``Supernet.stages``). So the scorer keeps each stage's
output on the fold's batches, keyed by the prefix of genes it was computed for, in a cache bounded
in bytes (least recently used out first), and starts each selection from the longest prefix it
holds.

With BN re-estimation, each stage's statistics are re-estimated when that stage is computed, from
the previous stage's train-mode outputs on the calibration batches: in train mode a stage's output
does not depend on running statistics, so this gives the statistics, and the logits, of
``recalibrate_bn`` on the whole network.
"""
from collections import OrderedDict
from collections.abc import Sequence
from itertools import accumulate

import torch

from models import Supernet
from models.supernet import Stage
from quant.functional import pieces_of

from .bn_recalibration import calibration_piece, fresh_bn_statistics
from .data import Batch, to_device
from .pieces import evaluation_groups

Activations = tuple[list[torch.Tensor], list[torch.Tensor]]  # calibration outputs, scored outputs


class PrefixScorer:
    """Top-1 of selections on fixed ``batches``, each stage computed once per distinct prefix.

    ``calibration``: training batches to re-estimate BN statistics on for every selection (empty:
    use the model's own statistics). The model must be in eval mode, as for ``accuracy_on``.
    ``replicas``: LSQ's ``k`` from the pieces the reference's ``nn.DataParallel`` cut each batch into
    (``Evaluation.accuracy``): each batch is kept as its runs of equal pieces.
    ``computed`` counts the stage computations (the plain way does every stage per selection).
    """

    def __init__(self, model: Supernet, batches: Sequence[Batch], calibration: Sequence[Batch],
                 device: torch.device, cache_bytes: float = 2 * 2**30, replicas: int = 1):
        self.model = model
        self.stages = model.stages()
        self.ends = list(accumulate(stage.genes for stage in self.stages))
        scored = [(to_device(images, device), groups) for images, _ in batches
                  for groups in [evaluation_groups(len(images), replicas)]]
        # The piece size each kept tensor's quantizers take k from, the calibration's then the scored.
        self.pieces = ([calibration_piece(len(images), replicas) for images, _ in calibration],
                       [size for _, groups in scored for _, _, size in groups])
        self.start: Activations = ([to_device(images, device) for images, _ in calibration],
                                   [x[start:stop] for x, groups in scored for start, stop, _ in groups])
        if not batches:
            raise ValueError("no batches to score on")
        self.labels = torch.cat([labels for _, labels in batches]).to(device)
        self.cache: OrderedDict[tuple, tuple[Activations, int]] = OrderedDict()
        self.cache_bytes, self.used = cache_bytes, 0
        self.computed = 0

    @torch.no_grad()
    def logits(self, selection: Sequence[int]) -> torch.Tensor:
        selection = tuple(self.model.check_selection(selection))
        first, acts = 0, self.start
        for j in reversed(range(len(self.stages) - 1)):  # the longest prefix held
            key = (j, selection[:self.ends[j]])
            if key in self.cache:
                self.cache.move_to_end(key)
                first, acts = j + 1, self.cache[key][0]
                break
        for j in range(first, len(self.stages)):
            genes = selection[self.ends[j] - self.stages[j].genes:self.ends[j]]
            acts = self._compute(self.stages[j], genes, acts)
            if j < len(self.stages) - 1:  # the logits are not worth keeping
                self._keep((j, selection[:self.ends[j]]), acts)
        return torch.cat(acts[1])

    def accuracy(self, selection: Sequence[int]) -> float:
        """Top-1 in percent, as ``accuracy_on``."""
        logits = self.logits(selection)
        return 100.0 * int((logits.argmax(dim=1) == self.labels).sum().item()) / self.labels.numel()

    def _compute(self, stage: Stage, genes: Sequence[int], acts: Activations) -> Activations:
        self.computed += 1
        calibration, scored = acts

        def run(xs: list[torch.Tensor], pieces: list[int]) -> list[torch.Tensor]:
            outputs = []
            for x, piece in zip(xs, pieces, strict=True):
                with pieces_of(piece):
                    outputs.append(stage.run(x, genes))
            return outputs

        if calibration:
            with fresh_bn_statistics(stage.modules):  # as recalibrate_bn, for this stage alone
                calibration = run(calibration, self.pieces[0])
        return calibration, run(scored, self.pieces[1])

    def _keep(self, key: tuple, acts: Activations) -> None:
        size = sum(t.numel() * t.element_size() for part in acts for t in part)
        if size > self.cache_bytes:
            return
        while self.used + size > self.cache_bytes:
            _, (_, freed) = self.cache.popitem(last=False)
            self.used -= freed
        self.cache[key] = (acts, size)
        self.used += size

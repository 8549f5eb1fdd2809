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
from training.memory import device_free
from training.pieces import evaluation_groups, run_in_pieces
from utils.data import Batch, to_device

from .bn_recalibration import calibration_piece, fresh_bn_statistics

Activations = tuple[list[torch.Tensor], list[torch.Tensor]]  # calibration outputs, scored outputs


MARGIN = 0.9  # of the free GPU memory: the rest for the allocator's fragmentation and cuDNN
CPU_CACHE = 2 * 2**30  # the cache's default in host memory (on a GPU: what the fold leaves free)


class PrefixScorer:
    """Top-1 of selections on fixed ``batches``, each stage computed once per distinct prefix.

    ``calibration``: training batches to re-estimate BN statistics on for every selection (empty:
    use the model's own statistics). The model must be in eval mode, as for ``accuracy_on``.
    ``replicas``: LSQ's ``k`` from the pieces the reference's ``nn.DataParallel`` cut each batch into
    (``Evaluation.accuracy``): each batch is kept as its runs of equal pieces.
    ``computed`` counts the stage computations (the plain way does every stage per selection).

    ``chunk``: how many batches are computed at once (0: all). The scorer keeps on the device the
    images of the batches it computes, as float32, and two stage outputs of them at a time (a
    stage's input and output), plus the cache; a fold whose whole stage outputs do not fit is
    computed chunk after chunk (``on_device`` chooses), its cache entries per chunk. Each batch is
    computed alone either way, so the logits are the same, bit for bit.
    """

    def __init__(self, model: Supernet, batches: Sequence[Batch], calibration: Sequence[Batch],
                 device: torch.device, cache_bytes: float = 2 * 2**30, chunk: int = 0,
                 replicas: int = 1):
        if not batches:
            raise ValueError("no batches to score on")
        self.model, self.device = model, device
        self.stages = model.stages()
        self.ends = list(accumulate(stage.genes for stage in self.stages))
        self.batches = list(batches)
        chunk = chunk or len(batches)
        self.chunks = [range(i, min(i + chunk, len(batches))) for i in range(0, len(batches), chunk)]
        self.calibration = [to_device(images, device) for images, _ in calibration]
        # Each scored batch is kept as its runs of equal pieces; the piece size each kept tensor's
        # quantizers take k from, the calibration's and each chunk's.
        self.groups = [evaluation_groups(len(images), replicas) for images, _ in batches]
        self.pieces = [calibration_piece(len(images), replicas) for images, _ in calibration]
        self.chunk_pieces = [[size for i in c for _, _, size in self.groups[i]] for c in self.chunks]
        # One chunk: the fold's images converted once, for every selection.
        self.start = self._start(0) if len(self.chunks) == 1 else None
        self.labels = torch.cat([labels for _, labels in batches]).to(device)
        self.cache: OrderedDict[tuple, tuple[Activations, int]] = OrderedDict()
        self.cache_bytes, self.used = cache_bytes, 0
        self.computed = 0

    @classmethod
    def on_device(cls, model: Supernet, batches: Sequence[Batch], calibration: Sequence[Batch],
                  device: torch.device, cache_bytes: float | None, replicas: int = 1) -> "PrefixScorer":
        """A scorer that fits ``device`` (``fold_chunk``): the fold moved to a GPU and computed at
        once where it has room, else left in host memory and computed chunk after chunk. A cache
        of ``None`` bytes takes what the fold leaves free on a GPU (``cache_room``), so a large
        card keeps every stage's outputs of the fold; on the CPU ``CPU_CACHE``. ``chose`` says what
        it chose, for the log."""
        given = cache_bytes is not None
        if given:
            chunk = fold_chunk(model, batches, calibration, device, cache_bytes)
        else:  # the fold first, the cache in what it leaves
            chunk = fold_chunk(model, batches, calibration, device, 0)
            cache_bytes = cache_room(model, batches, calibration, device) if chunk == 0 else 0
        if device.type == "cuda" and chunk == 0:
            batches = [(x.to(device), y.to(device)) for x, y in batches]
        scorer = cls(model, batches, calibration, device, cache_bytes, chunk, replicas)
        source = ("--prefix_cache_gb" if given else
                  "what the fold leaves free" if device.type == "cuda" else "the default in host memory")
        scorer.chose = (f"prefix cache {cache_bytes / 2**30:.2f} GiB ({source}), the fold "
                        + ("at once" if chunk == 0 else f"{chunk} batches at a time")
                        + (f" on {device}" if device.type == "cuda" else ""))
        return scorer

    def _start(self, chunk: int) -> Activations:
        scored = []
        for i in self.chunks[chunk]:
            x = to_device(self.batches[i][0], self.device)
            scored += [x[start:stop] for start, stop, _ in self.groups[i]]
        return self.calibration, scored

    @torch.no_grad()
    def logits(self, selection: Sequence[int]) -> torch.Tensor:
        selection = tuple(self.model.check_selection(selection))
        return torch.cat([self._chunk_logits(c, selection) for c in range(len(self.chunks))])

    def _chunk_logits(self, chunk: int, selection: tuple[int, ...]) -> torch.Tensor:
        first, acts = 0, None
        for j in reversed(range(len(self.stages) - 1)):  # the longest prefix held
            key = (chunk, j, selection[:self.ends[j]])
            if key in self.cache:
                self.cache.move_to_end(key)
                first, acts = j + 1, self.cache[key][0]
                break
        if acts is None:
            acts = self.start if self.start is not None else self._start(chunk)
        for j in range(first, len(self.stages)):
            genes = selection[self.ends[j] - self.stages[j].genes:self.ends[j]]
            acts = self._compute(self.stages[j], genes, acts, self.chunk_pieces[chunk])
            if j < len(self.stages) - 1:  # the logits are not worth keeping
                self._keep((chunk, j, selection[:self.ends[j]]), acts)
        return torch.cat(acts[1])

    def accuracy(self, selection: Sequence[int]) -> float:
        """Top-1 in percent, as ``accuracy_on``."""
        logits = self.logits(selection)
        return 100.0 * int((logits.argmax(dim=1) == self.labels).sum().item()) / self.labels.numel()

    def _compute(self, stage: Stage, genes: Sequence[int], acts: Activations,
                 pieces: list[int]) -> Activations:
        self.computed += 1
        calibration, scored = acts

        def run(xs: list[torch.Tensor], pieces: list[int]) -> list[torch.Tensor]:
            outputs = []
            for x, piece in zip(xs, pieces, strict=True):
                outputs.append(run_in_pieces(lambda x: stage.run(x, genes), x, piece))
            return outputs

        if calibration:
            with fresh_bn_statistics(stage.modules):  # as recalibrate_bn, for this stage alone
                calibration = run(calibration, self.pieces)
        return calibration, run(scored, pieces)

    def _keep(self, key: tuple, acts: Activations) -> None:
        size = sum(t.numel() * t.element_size() for part in acts for t in part)
        if size > self.cache_bytes:
            return
        while self.used + size > self.cache_bytes:
            _, (_, freed) = self.cache.popitem(last=False)
            self.used -= freed
        self.cache[key] = (acts, size)
        self.used += size


@torch.no_grad()
def bytes_per_image(model: Supernet, image_shape: Sequence[int], device: torch.device) -> int:
    """What the scorer keeps on the device per image at its peak: the image as float32 and the two
    largest consecutive stage outputs (a stage's input and output alive at once), from one image
    run through the stages."""
    x = torch.zeros(1, *image_shape, device=device)
    sizes, selection = [x.numel() * 4], [0] * model.num_searchable_layers
    was_training = model.training
    model.eval()
    start = 0
    for stage in model.stages():
        x = stage.run(x, selection[start:start + stage.genes])
        start += stage.genes
        sizes.append(x.numel() * x.element_size())
    model.train(was_training)
    return sizes[0] + max(a + b for a, b in zip(sizes, sizes[1:], strict=False))


def fold_chunk(model: Supernet, batches: Sequence[Batch], calibration: Sequence[Batch],
               device: torch.device, cache_bytes: float) -> int:
    """How many of ``batches`` a ``PrefixScorer`` on ``device`` computes at once: 0 (all, the fold
    kept on the device as uint8) on the CPU, or where everything the scorer keeps fits the GPU's free
    memory: the fold, its images as float32 and two stage outputs (``bytes_per_image``), the
    calibration batches' likewise, and the cache. Otherwise the fold stays in host memory and the
    scorer computes as many batches at once as fit (at least one)."""
    if device.type != "cuda":
        return 0
    per_image = bytes_per_image(model, batches[0][0].shape[1:], device)
    room = (MARGIN * device_free(device) - cache_bytes
            - per_image * sum(len(images) for images, _ in calibration))
    uint8 = sum(images.numel() * images.element_size() for images, _ in batches)
    if uint8 + per_image * sum(len(images) for images, _ in batches) <= room:
        return 0
    return max(1, int(room // (per_image * max(len(images) for images, _ in batches))))


def cache_room(model: Supernet, batches: Sequence[Batch], calibration: Sequence[Batch],
               device: torch.device) -> float:
    """The prefix cache's default: on a GPU what the fold, there at once, leaves of ``fold_chunk``'s
    room; ``CPU_CACHE`` elsewhere."""
    if device.type != "cuda":
        return CPU_CACHE
    per_image = bytes_per_image(model, batches[0][0].shape[1:], device)
    images = sum(len(x) for x, _ in batches) + sum(len(x) for x, _ in calibration)
    uint8 = sum(x.numel() * x.element_size() for x, _ in batches)
    return max(0.0, MARGIN * device_free(device) - uint8 - per_image * images)

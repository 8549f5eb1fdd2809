"""Stage 2 frees a fold's scorer before the next fold's room check: its footprint is the same from
fold to fold, without a garbage collection."""
import gc
import weakref

import torch

from search import prefix_scorer
from search.prefix_scorer import PrefixScorer

from .test_stage2 import K, captured, shared_supernet, stage2, stage2_args


def live_tensor_bytes() -> int:
    """Bytes of the storages of every tensor Python holds (each storage once)."""
    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and not obj.is_meta:  # type(): no proxy's __class__
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_a_fold_scorer_is_gone_before_the_next_fold_without_a_garbage_collection(
        tmp_path, tmp_path_factory, image_folder, monkeypatch):
    """Three folds with ``gc`` disabled: when a fold's scorer is made, every earlier fold's is gone
    (freed by reference counting: no cycle holds it) and the tensors alive are those of the
    previous fold's start, byte for byte (the validation batches are all decoded in fold 0, for its
    winner's full accuracy). The former ``ranked`` closure, which held the search that held it,
    kept each fold's scorer until a collection."""
    supernet = shared_supernet(tmp_path_factory, image_folder)
    scorers, footprints, real = [], [], PrefixScorer.on_device.__func__

    def on_device(cls, *args):
        assert all(ref() is None for ref in scorers), "an earlier fold's scorer is alive"
        footprints.append(live_tensor_bytes())
        scorer = real(cls, *args)
        scorers.append(weakref.ref(scorer))
        return scorer

    monkeypatch.setattr(prefix_scorer.PrefixScorer, "on_device", classmethod(on_device))
    args = stage2_args(image_folder, supernet, tmp_path / "search", "--k", str(K + 1))
    gc.collect()
    gc.disable()
    try:
        captured(stage2.search, args)
    finally:
        gc.enable()
    assert len(scorers) == K + 1 and footprints[1] == footprints[2]


def test_cached_blocks_count_as_free_and_the_default_cache_takes_what_the_fold_leaves(monkeypatch):
    """PyTorch's cached, unused blocks (reserved - allocated) are free for the next fold; the
    default cache is 90 % of the free memory less the fold at once (its uint8 images, and per image
    the float32 image and two stage outputs), 0 where the fold must be cut; 2 GiB on the CPU."""
    from .test_prefix_scorer import CPU, fake_gpu, trained_like

    model = trained_like("mobilenet_v2")
    batches = [(torch.zeros(6, 3, 12, 12, dtype=torch.uint8), torch.zeros(6, dtype=torch.long))
               for _ in range(4)]
    fold = 24 * (3 * 12 * 12 + prefix_scorer.bytes_per_image(model, (3, 12, 12), CPU))
    device = fake_gpu(monkeypatch, 10**6)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 5 * 10**6)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 10**6)
    assert prefix_scorer.device_free(device) == 5 * 10**6
    assert prefix_scorer.cache_room(model, batches, [], device) == 0.9 * 5 * 10**6 - fold
    assert prefix_scorer.cache_room(model, batches, [], CPU) == prefix_scorer.CPU_CACHE == 2 * 2**30
    scorer = PrefixScorer.on_device(model, batches, [], CPU, None)
    assert scorer.cache_bytes == 2 * 2**30 and scorer.chose.startswith("prefix cache 2.00 GiB (the default")

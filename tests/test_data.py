"""The data pipeline: uint8 images from the workers, normalised where the model runs to the values of
torchvision's ToTensor + Normalize; an order and augmentation that depend on (seed, epoch) alone."""
import time

import pytest
import torch
from PIL import Image
from torchvision import transforms

from training.pieces import Share
from training.step import DataWait
from utils.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EpochSampler,
    ShareBatches,
    ValidationBatches,
    batch_stream,
    build_datasets,
    started_loader,
    to_device,
    train_loader,
    train_transform,
    val_loader,
    val_transform,
)

CPU = torch.device("cpu")


def random_image(seed: int, size=(37, 29)) -> Image.Image:
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.to(torch.uint8).numpy())


@pytest.mark.parametrize("path", ["kernel", "pytorch"])
def test_to_device_gives_the_values_of_totensor_and_normalize(path, monkeypatch):
    from cpu_kernels import library as native

    if path == "pytorch":
        monkeypatch.setattr(native, "library", lambda: None)
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ramp = torch.arange(256, dtype=torch.uint8).view(16, 16, 1).repeat(1, 1, 3)
    every_value = Image.fromarray(ramp.numpy())
    images = [every_value, *(random_image(i) for i in range(3))]
    images = [im.resize((16, 16)) if im.size != (16, 16) else im for im in images]
    ours = to_device(torch.stack([transforms.PILToTensor()(im) for im in images]), CPU)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, torch.stack([reference(im) for im in images]))  # bit for bit
    already = torch.randn(2, 3, 4, 4)
    assert to_device(already, CPU) is already  # normalised floats only move


def test_transforms_hand_over_uint8():
    image = random_image(0, (64, 48))
    for transform in (train_transform(32), val_transform(32)):
        out = transform(image)
        assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    assert train_transform(32, grayscale=True)(image.convert("L")).shape == (3, 32, 32)


def test_sampler_order_depends_on_seed_and_epoch_and_starts_anywhere():
    sampler = EpochSampler(50, seed=3, epoch=2)
    full = list(sampler)
    assert sorted(i for i, _ in full) == list(range(50)) and list(sampler) == full
    sampler.set_epoch(2, start=20)
    assert list(sampler) == full[20:]
    sampler.set_epoch(3)
    assert [i for i, _ in sampler] != [i for i, _ in full]
    assert len({seed for _, seed in full}) == 50  # each sample's augmentation has a seed of its own


def test_each_process_loads_its_pieces_of_every_global_batch():
    """Process r of W gets pieces r*R/W ... (r+1)*R/W - 1 of each global batch (torch.chunk's
    sizes), so that the processes' shares together are the global batches; the partial last kept."""
    full = list(ShareBatches(EpochSampler(50, 3, 2), 12, drop_last=False))
    assert [len(b) for b in full] == [12] * 4 + [2]
    for world in (1, 2, 4):
        shares = [list(ShareBatches(EpochSampler(50, 3, 2), 12, drop_last=False,
                                    share=lambda n, r=r, w=world: Share.of(n, 4, w, r)))
                  for r in range(world)]
        assert [sum(parts, []) for parts in zip(*shares, strict=True)] == full
        assert [len(b) for b in shares[0]] == [12 // world] * 4 + [min(2, 4 // world)]
    assert len(ShareBatches(EpochSampler(50, 3, 2), 12, drop_last=True)) == 4


def test_augmentation_is_the_same_with_any_number_of_workers_and_after_a_resume(image_folder):
    data = build_datasets(str(image_folder), 24)
    rng = torch.get_rng_state()

    def batches(workers, epoch=0, batch=0, count=9):
        stream = batch_stream(data.train, 5, workers, seed=1, epoch=epoch, batch=batch)
        return [next(stream) for _ in range(count)]

    serial = batches(0)
    assert torch.equal(torch.get_rng_state(), rng)  # the augmentation leaves the caller's generator alone
    parallel = batches(2)
    resumed = batches(2, epoch=serial[4][0], batch=serial[4][1], count=5)
    for (e1, b1, (x1, y1)), (e2, b2, (x2, y2)) in zip(serial, parallel, strict=True):
        assert (e1, b1) == (e2, b2) and torch.equal(x1, x2) and torch.equal(y1, y2)
        assert x1.dtype == torch.uint8
    for (_, _, (x1, _)), (_, _, (x2, _)) in zip(serial[4:], resumed, strict=True):
        assert torch.equal(x1, x2)
    assert [e for e, _, _ in serial] == [0] * 7 + [1] * 2  # 36 images in 7 batches of 5 an epoch


def test_training_loader_keeps_its_workers_and_pins_for_gpus(image_folder, monkeypatch):
    from utils import distributed

    data = build_datasets(str(image_folder), 24)
    monkeypatch.setattr(distributed, "_in_use", torch.device("cuda", 0))  # a stage on a GPU
    assert train_loader(data.train, 4, 0, seed=0)[0].pin_memory
    monkeypatch.setattr(distributed, "_in_use", torch.device("cpu"))
    loader, sampler = train_loader(data.train, 4, 2, seed=0, drop_last=False)
    assert loader.persistent_workers and not loader.pin_memory
    sizes = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        sizes.append([len(y) for _, y in loader])
    assert sizes == [[4] * 9] * 2  # 36 images: nine whole batches an epoch
    loader, sampler = train_loader(data.train, 5, 0, seed=0, drop_last=False)
    assert [len(y) for _, y in loader][-1] == 1  # the last, partial batch kept


def test_a_started_loader_serves_streams_of_any_seed_as_their_own_loaders_would(image_folder):
    """Stage 3's archs share one started loader (its workers forked before memory grows): each
    arch's stream, of its own seed, with or without the last partial batch, gives the batches a
    loader of its own gives; a stream resumed after another took the loader over stops."""
    data = build_datasets(str(image_folder), 24)  # 36 training images
    source = started_loader(data.train, 5, 2, seed=7)

    def batches(stream, count):
        return [(e, b, x, y) for e, b, (x, y) in (next(stream) for _ in range(count))]

    def same(got, want):
        assert len(got) == len(want)
        for (e1, b1, x1, y1), (e2, b2, x2, y2) in zip(got, want, strict=True):
            assert (e1, b1) == (e2, b2) and torch.equal(x1, x2) and torch.equal(y1, y2)

    first = batch_stream(data.train, 5, 2, seed=3, source=source)
    head = batches(first, 2)
    for seed, drop_last in ((4, True), (5, False)):  # 36 images: 7 or 8 batches an epoch
        same(batches(batch_stream(data.train, 5, 2, seed, drop_last=drop_last, source=source), 9),
             batches(batch_stream(data.train, 5, 0, seed, drop_last=drop_last), 9))
    with pytest.raises(RuntimeError, match="another stream took its loader over"):
        next(first)
    own = batches(batch_stream(data.train, 5, 0, seed=3), 11)
    again = batch_stream(data.train, 5, 2, seed=3, batch=2, source=source)
    same(head + batches(again, 9), own)  # past the epoch's end: seed 3's order again, not seed 5's
    assert [b for _, b, _, _ in own] == list(range(7)) + list(range(4))


def test_data_wait_times_the_loop_waiting_for_batches():
    def slow():
        for i in range(3):
            time.sleep(0.02)
            yield i

    wait = DataWait()
    assert list(wait(slow())) == [0, 1, 2]
    assert wait.steps == 3 and 15 <= wait.per_step_ms() < 200
    wait.reset()
    assert wait.per_step_ms() == 0.0


@pytest.mark.parametrize("workers", [0, 2])
def test_validation_batches_in_memory_or_decoded_when_asked(image_folder, workers):
    """The batches asked for, in order, from memory or decoded now: with workers, by the same
    persistent ones each time (started with the ``ValidationBatches``), a pass cut short included."""
    val = build_datasets(str(image_folder), 24).val  # 24 images
    reference = list(val_loader(val, 5, 0))
    kept = ValidationBatches(val, 5, workers)
    streamed = ValidationBatches(val, 5, workers, cache_bytes=1)
    assert kept.keeps_all and not streamed.keeps_all and len(kept) == len(streamed) == 5
    started = [source.loader._iterator for source in (kept, streamed)]
    assert [it is None for it in started] == [workers == 0] * 2
    next(streamed.stream([2, 3]))  # a pass cut short: the next one starts afresh
    for source in (kept, streamed):
        for indices in ([0], [4, 1], [1, 2, 3], range(5)):
            got = list(source.stream(indices))
            want = [reference[i] for i in sorted(indices)]
            assert len(got) == len(want)
            for a, b in zip(got, want, strict=True):
                assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert streamed.kept([0, 1]) is None  # two batches do not fit in one byte
    fold = ValidationBatches(val, 5, workers, cache_bytes=2.5 * streamed.batch_bytes).kept([3, 4])
    assert [len(y) for _, y in fold] == [5, 4]  # the last batch is partial, as in the loader
    assert [source.loader._iterator for source in (kept, streamed)] == started  # no new workers
    assert len(ValidationBatches(val, 5, 0, max_batches=2)) == 2
    with pytest.raises(IndexError, match="beyond the 5 validation batches"):
        list(streamed.stream([5]))


def test_stage2_decodes_each_image_about_once_per_fold_when_the_set_does_not_fit(tmp_path, monkeypatch):
    """A JPEG folder over --val_cache_gb: the fold is decoded once for all of its candidates and
    the other batches once for the winner's full accuracy; the result is the in-memory one."""
    import json

    import PIL.Image

    from .conftest import load_script, make_image_folder
    from .test_stage2 import MODEL, SEARCH, SUPERNET, VAL_BATCH, captured

    stage1, stage2 = load_script("01train_supernet.py"), load_script("02kfold_evolution.py")
    folder = make_image_folder(tmp_path / "jpeg", suffix="jpg")
    captured(stage1.train, stage1.parse_args(["--data", str(folder), "--teacher", "none", "--save",
                                              str(tmp_path / "s1"), *MODEL, "--batch_size", "8",
                                              "--replicas", "2", "-j", "0",
                                              "--abin_total_iters", "2", "--awbin_total_iters", "2"]))
    supernet = tmp_path / "s1" / SUPERNET
    opened: dict[str, int] = {}
    real_open = PIL.Image.open

    def counting_open(fp, *args, **kwargs):
        if "/val/" in str(fp):
            opened[str(fp)] = opened.get(str(fp), 0) + 1
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting_open)
    batch_bytes = VAL_BATCH * 3 * 32 * 32  # uint8 at 32 px
    fold_fits = str(3.5 * batch_bytes / 2**30)  # 6 batches in 2 folds: a fold fits, the set does not
    results = {}
    for name, cache in (("streamed", fold_fits), ("in memory", "8")):
        opened.clear()
        args = stage2.parse_args(["--data", str(folder), "--supernet", str(supernet), "--save",
                                  str(tmp_path / name), "-j", "0", *MODEL, *SEARCH, "--folds", "1",
                                  "--val_cache_gb", cache])
        captured(stage2.search, args)
        results[name] = json.loads((tmp_path / name / "search_result.json").read_text())
        assert len(opened) == 24 and max(opened.values()) <= 2 + 1  # + the size probe of the first image
        if name == "streamed":
            assert sum(opened.values()) <= 24 + 1
    assert results["streamed"]["archs"] == results["in memory"]["archs"]
    assert results["streamed"]["fold_accs"] == results["in memory"]["fold_accs"]
    assert results["streamed"]["full_accs"] == results["in memory"]["full_accs"]


class Counted(torch.utils.data.Dataset):
    """A dataset that counts how often each sample is read (decoded)."""

    def __init__(self, size: int):
        self.size, self.reads = size, [0] * size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        self.reads[index] += 1
        return torch.full((3, 2, 2), index, dtype=torch.uint8), index


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")  # the stand-in's CUDA
def test_validation_batches_decode_only_what_is_asked_for_once_and_pin_only_batches_in_flight(monkeypatch):
    """A process decodes the batches of its folds and the full-accuracy batches, each once, not the
    whole set up front, all through one loader; kept batches are not pinned, streamed ones are (when
    the stage uses a GPU): a kept fold of a streamed set is copied out of the loader's batches."""
    from utils import data

    pinned = []

    class Recording(data.DataLoader):
        def __init__(self, *args, pin_memory: bool, **kwargs):
            super().__init__(*args, pin_memory=False, **kwargs)  # no CUDA here to pin with
            self.pin_memory = pin_memory
            pinned.append(pin_memory)

    monkeypatch.setattr(data, "DataLoader", Recording)
    monkeypatch.setattr(data.distributed, "pin_memory", lambda: True)
    dataset = Counted(20)
    val = ValidationBatches(dataset, 4, 0)  # five batches, all kept
    assert val.keeps_all and sum(dataset.reads) == 1  # the size probe alone
    fold = val.kept([1, 2])
    assert [int(y[0]) for _, y in fold] == [4, 8] and pinned == [False]
    state = torch.get_rng_state()
    rest = list(val.stream([0, 3, 4, 1, 2]))  # the full-accuracy batches: only 0, 3, 4 decoded
    # Decoding during a stage leaves the generator that draws the training augmentation alone.
    assert torch.equal(torch.get_rng_state(), state)
    assert [int(y[0]) for _, y in rest] == [0, 4, 8, 12, 16] and pinned == [False]  # the same loader
    list(val.stream(range(5)))
    assert dataset.reads == [2] + [1] * 19  # each sample once (and the probe)
    streamed = ValidationBatches(Counted(20), 4, 0, cache_bytes=2 * val.batch_bytes)
    assert not streamed.keeps_all and pinned[1:] == [True]  # streamed batches in flight are pinned
    loaded = []
    real = streamed._decode
    monkeypatch.setattr(streamed, "_decode", lambda indices: (loaded.append(b) or b for b in real(indices)))
    kept = streamed.kept([2, 3])
    assert [int(y[0]) for _, y in kept] == [8, 12] and len(loaded) == 2
    for (x, y), (xl, yl) in zip(kept, loaded, strict=True):  # copies, in ordinary memory
        assert torch.equal(x, xl) and x.data_ptr() != xl.data_ptr() and y.data_ptr() != yl.data_ptr()

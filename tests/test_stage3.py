"""Stage 3 from a stage-2 result: checkpoints, the JSON and printed results, what fine-tuning may
change, bad input, and the three scripts in a row as the README runs them.

The trainable set against the reference fixture is tested in test_mobilenet_v2.py.
"""
import json
import re
from pathlib import Path

import pytest
import torch

from search.folds import fold_batches
from utils.checkpoint import load_file, load_supernet
from utils.data import build_datasets, val_loader

from .conftest import ROOT, load_script, normalised, run_script
from .test_stage2 import (
    MODEL,
    block,
    captured,
    check_bad_case,
    one_thread,
    run_bad_cases,
    shared_search_run,
    shared_supernet,
)

stage3 = load_script("03finetune.py")

K = 2
EPOCHS = 2
VAL_BATCH = 4
# A learning rate well above the reference's 7.5e-6, so that two iterations visibly move what is trained.
FINETUNE = ["--k", str(K), "--bn_epochs", str(EPOCHS), "--iters_per_epoch", "2", "--batch_size", "4",
            "--replicas", "2",
            "--val_batch_size", str(VAL_BATCH), "--learning_rate_bnstabilize", "1e-3"]
RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def supernet(tmp_path_factory, image_folder) -> Path:
    return shared_supernet(tmp_path_factory, image_folder)


@pytest.fixture(scope="module")
def found(tmp_path_factory, image_folder) -> dict:
    """The stage-2 result, from its JSON file (with ``path`` added)."""
    save = shared_search_run(tmp_path_factory, image_folder)[0]
    path = save / "search_result.json"
    return {**json.loads(path.read_text()), "path": path}


def stage3_args(data, supernet, found, save, *extra):
    return stage3.parse_args(["--data", str(data), "--supernet", str(supernet), "--search-result",
                              str(found["path"]), "--save", str(save), "-j", "0", *MODEL, *FINETUNE, *extra])


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory, image_folder, supernet, found):
    """A finished stage-3 run: ``(save folder, returned summary, printed text)``."""
    save = tmp_path_factory.mktemp("stage3")
    summary, text = captured(stage3.finetune, stage3_args(image_folder, supernet, found, save))
    return save, summary, text


def checkpoint_path(save: Path, fold: int, epoch: int) -> Path:
    return save / f"arch{fold}_model_actwbin_2_2_bn_{epoch}ep.pth"


def test_reference_defaults():
    args = stage3.parse_args([])
    assert (args.k, args.bn_epochs, args.learning_rate_bnstabilize) == (10, 3, 7.5e-6)
    assert (args.train_clip, args.val_batch_size, args.save) == (True, 200, "eval-blast")
    assert (args.batch_size, args.iters_per_epoch) == (768, 0)  # whole epochs of 768
    assert args.search_result is None  # the authors' published archs, for their model
    assert stage3.parse_args(["--train_clip", "False"]).train_clip is False


def test_checkpoints_per_fold_and_epoch(finetune_run, found, image_folder):
    save = finetune_run[0]
    expected = {checkpoint_path(save, f, e).name for f in range(K) for e in range(EPOCHS)}
    assert {p.name for p in save.glob("*.pth")} == expected
    data = build_datasets(str(image_folder), 32)
    batches = list(val_loader(data.val, VAL_BATCH, 0))
    for fold, arch in enumerate(found["archs"]):
        for epoch in range(EPOCHS):  # counted from 0, as the reference names them
            ckpt = load_file(checkpoint_path(save, fold, epoch))  # safe loading
            assert ckpt["config"] == found["config"]
            assert ckpt["selection"] == arch
            assert (ckpt["fold"], ckpt["epoch"]) == (fold, epoch)
            # The accuracy stored is the checkpoint's own on the batches outside the fold.
            model, _ = load_supernet(checkpoint_path(save, fold, epoch), found["config"])
            model.eval()
            model.change_precision(True, True)
            correct = total = 0
            with torch.no_grad(), one_thread():
                for i in fold_batches(len(batches), K, fold)[1]:
                    images, labels = batches[i]
                    correct += int((model(normalised(images), tuple(arch)).argmax(1) == labels).sum())
                    total += len(labels)
            assert ckpt["best_top1_acc"] == 100.0 * correct / total


def test_final_result_json_and_block(finetune_run, found):
    save, summary, text = finetune_run
    final = json.loads((save / "final_result.json").read_text())
    assert final["config"] == found["config"]
    assert (final["fold_accs"], final["full_accs"], final["archs"]) == (
        found["fold_accs"], found["full_accs"], found["archs"])
    printed = block(text, "final-result")
    assert list(printed) == ["fold_accs", "full_accs", "**bnfull_accs", "archs"]
    assert printed == {"fold_accs": final["fold_accs"], "full_accs": final["full_accs"],
                       "**bnfull_accs": final["bnfull_accs"], "archs": final["archs"]}
    assert printed == summary
    assert "archs: [(" in text


def test_bnfull_acc_is_the_best_of_stage2_and_every_epoch(finetune_run, found):
    save, summary, text = finetune_run
    for fold in range(K):
        epochs = [load_file(checkpoint_path(save, fold, e))["best_top1_acc"] for e in range(EPOCHS)]
        assert summary["**bnfull_accs"][fold] == max([found["full_accs"][fold], *epochs])
        # Before fine-tuning, stage 3 measures what stage 2 measured on the same batches.
        stage2_acc, loaded = re.search(rf"arch {fold}: stage-2 full_acc (\S+), loaded (\S+)", text).groups()
        assert stage2_acc == loaded


def changed(supernet_state, state) -> set[str]:
    return {k for k, v in supernet_state.items() if not torch.equal(v, state[k])}


def test_only_biases_and_clips_change(finetune_run, supernet):
    save = finetune_run[0]
    before = load_file(supernet)["model_state_dict"]
    for path in save.glob("*.pth"):
        moved = changed(before, load_file(path)["model_state_dict"])
        trained = {k for k in moved if not k.endswith(RUNNING_STATS)}
        assert all("bias" in k or k.endswith("upper_bound") for k in trained), sorted(trained)
        assert any("bias" in k for k in trained) and any(k.endswith("upper_bound") for k in trained)
        assert any(k.endswith("running_mean") for k in moved)  # trained in train mode


def test_train_clip_false_keeps_the_clips(tmp_path, image_folder, supernet, found):
    captured(stage3.finetune, stage3_args(image_folder, supernet, found, tmp_path, "--train_clip", "false",
                                          "--bn_epochs", "1"))
    before = load_file(supernet)["model_state_dict"]
    for fold in range(K):
        moved = changed(before, load_file(checkpoint_path(tmp_path, fold, 0))["model_state_dict"])
        trained = {k for k in moved if not k.endswith(RUNNING_STATS)}
        assert trained and all("bias" in k for k in trained), sorted(trained)


def test_whole_epochs_include_the_last_partial_batch(tmp_path, image_folder, supernet, found, monkeypatch):
    seen = []
    real = stage3.train_step

    def spy(model, images, *rest):
        seen.append(len(images))
        return real(model, images, *rest)

    monkeypatch.setattr(stage3, "train_step", spy)
    args = stage3_args(image_folder, supernet, found, tmp_path, "--iters_per_epoch", "0",
                       "--batch_size", "8", "--replicas", "2")
    captured(stage3.finetune, args)
    train_images = len(build_datasets(str(image_folder), 32).train)
    assert train_images % 8  # the set does not split evenly, so the last batch is partial
    per_epoch = [8] * (train_images // 8) + [train_images % 8]
    assert seen == per_epoch * EPOCHS * K


def test_every_parameter_has_a_gradient_and_counts_in_the_clipped_norm(supernet, found):
    """The reference freezes with lr 0: every parameter gets a gradient (zero where unused)."""
    import copy

    model, _ = load_supernet(supernet, found["config"])
    model.change_precision(True, True)
    model.classifier[0].eval()  # the same forward twice
    twin = copy.deepcopy(model)
    arch = found["archs"][0]
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    torch.nn.functional.cross_entropy(twin(x, arch), y).backward()
    twin_grads = {n: p.grad for n, p in twin.named_parameters() if p.grad is not None}
    optimizer = stage3.bn_stabilize_optimizer(model, 1e-3)
    criterion = lambda logits, piece: torch.nn.functional.cross_entropy(logits, y[piece])  # noqa: E731
    _, _, norm = stage3.train_step(model, x, arch, criterion, optimizer)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert sorted(n for n, p in model.named_parameters() if not p.requires_grad) == sorted(
        n for n in model.state_dict() if n.endswith(".bin"))
    frozen = {n for g in optimizer.param_groups if g["lr"] == 0 for n in g["names"]}
    assert "feature.2.conv1.weights" in frozen and twin_grads["feature.2.conv1.weights"].abs().sum() > 0

    def total_norm(names):
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(twin_grads[n]) for n in names]))

    assert norm.item() == pytest.approx(total_norm(twin_grads).item(), rel=1e-5)
    trained_only = total_norm([n for n in twin_grads if n not in frozen])
    assert trained_only < 0.5 * norm  # the frozen parameters' gradients weigh in the clipping


def test_without_search_result_the_authors_archs_for_their_model_only(tmp_path):
    from types import SimpleNamespace

    from search import reference_results
    from utils.errors import UsageError

    model = SimpleNamespace(num_searchable_layers=17, num_branches=7)
    found, source = stage3.search_result(stage3.parse_args([]), dict(reference_results.CONFIG), model)
    assert found["folds"] == list(range(10)) and len(found["archs"]) == 10
    assert found["archs"][0] == [5, 3, 2, 2, 1, 1, 6, 6, 1, 2, 4, 6, 0, 3, 3, 5, 5]
    assert found["fold_accs"][4] == 55.18 and found["full_accs"][9] == 59.53333333333333
    assert "published" in source
    for flags, config in ((["--k", "5"], {}), ([], {"width_multiplier": 0.5}), ([], {"num_classes": 10})):
        with pytest.raises(UsageError, match="no --search-result: give stage 2's"):
            stage3.search_result(stage3.parse_args(flags), {**reference_results.CONFIG, **config}, model)


def test_a_pasted_block_with_log_prefixes(tmp_path, image_folder, supernet, found):
    from search.results import format_block

    rows = ("folds", "fold_accs", "full_accs", "archs")
    printed = format_block("total-result", {k: found[k] for k in rows})
    pasted = tmp_path / "pasted.txt"
    pasted.write_text("{02/22 06:44:31 AM}-(2484025)-fold 1: fold_acc 50.00\n" + "".join(
        f"{{02/22 06:44:32 AM}}-(2484025)-{line}\n" for line in printed.splitlines()))
    args = stage3_args(image_folder, supernet, {**found, "path": pasted}, tmp_path / "out",
                       "--bn_epochs", "0")
    summary, _ = captured(stage3.finetune, args)
    assert summary["archs"] == found["archs"] and summary["**bnfull_accs"] == found["full_accs"]
    log = (tmp_path / "out" / "log.txt").read_text()
    assert f"archs from {pasted}" in log
    assert "TF32: not used on the CPU" in log  # each stage says which convolutions it computes


def test_no_epochs_reports_the_stage2_accuracy(tmp_path, image_folder, supernet, found):
    summary, _ = captured(stage3.finetune, stage3_args(image_folder, supernet, found, tmp_path,
                                                       "--bn_epochs", "0"))
    assert summary["**bnfull_accs"] == found["full_accs"]
    assert not list(tmp_path.glob("*.pth"))


# ---------------------------------------------------------------------------------------------
# Bad input: a message naming the flag or file, a non-zero exit, no traceback, and nothing in the
# folder of the earlier successful run overwritten. The search-result checks one by one are in
# test_results.py; --k against the batches and the supernet checks in test_stage2.py.


def edited(found: dict, **changes) -> dict:
    result = {k: v for k, v in found.items() if k != "path"}
    result["config"] = {**result["config"], **changes.pop("config", {})}
    return {**result, **changes}


BAD_STAGE3 = {
    "missing": (["--search-result", "MISSING"], ["--search-result", "missing.json", "no such file"]),
    "malformed": (["--search-result", "malformed.json"], ["malformed.json", "not a JSON search result"]),
    "bits": (["--search-result", "bits.json"], ["bits.json", "bits=3", "the flags say 2"]),
    "branches": (["--search-result", "branches.json"], ["branches.json", "l2_vals=[0.01, 0.001]"]),
    "arch length": (["--search-result", "short.json"], ["short.json", "arch 0 is not 17 branch indices"]),
    "k": (["--k", "3"], ["search_result.json", "k=2", "here it is 3"]),
    "val split": (["--val_batch_size", "5"], ["search_result.json", "val_batch_size=4", "here it is 5"]),
    "pieces": (["--replicas", "1"], ["search_result.json", "replicas=2", "here it is 1", "--replicas"]),
}


@pytest.fixture(scope="module")
def bad_stage3_runs(finetune_run, image_folder, supernet, found, tmp_path_factory):
    save = finetune_run[0]
    tmp = tmp_path_factory.mktemp("bad-stage3")
    (tmp / "malformed.json").write_text('{"fold_accs": [1.0, 2.0], "archs": [[0, 1')
    (tmp / "bits.json").write_text(json.dumps(edited(found, config={"bits": 3})))
    (tmp / "branches.json").write_text(json.dumps(edited(found, config={"l2_vals": [0.01, 0.001]})))
    archs = [list(a) for a in found["archs"]]
    (tmp / "short.json").write_text(json.dumps(edited(found, archs=[archs[0][:-1], archs[1]])))
    replace = {"MISSING": str(tmp / "missing.json")}
    replace.update({f"{n}.json": str(tmp / f"{n}.json")
                    for n in ("malformed", "bits", "branches", "short")})
    command = ["03finetune.py", "--data", str(image_folder), "--supernet", str(supernet),
               "--search-result", str(found["path"]), "--save", str(save), "-j", "0", *MODEL, *FINETUNE]
    return run_bad_cases(command, BAD_STAGE3, replace, save)


@pytest.mark.parametrize("name", BAD_STAGE3)
def test_bad_input(bad_stage3_runs, name):
    check_bad_case(bad_stage3_runs, BAD_STAGE3, name)


# ---------------------------------------------------------------------------------------------


def test_three_stages_in_a_row(tmp_path, image_folder, monkeypatch):
    """The README's commands, run from a fresh folder so that every default path is exercised."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # see test_stage2.one_thread
    data = str(image_folder)
    stage1 = run_script(str(ROOT / "01train_supernet.py"), "--data", data, "--teacher", "none", *MODEL,
                        "--batch_size", "8", "--replicas", "2", "-j", "0", "--abin_total_iters", "1",
                        "--awbin_total_iters", "1",
                        cwd=tmp_path)
    assert stage1.returncode == 0, stage1.stderr
    supernet = "train-supernet/model_actwbin_best_00001it.pth"
    assert (tmp_path / supernet).is_file()
    stage2 = run_script(str(ROOT / "02kfold_evolution.py"), "--data", data, "--supernet", supernet, *MODEL,
                        "-j", "0", "--k", "2", "--val_batch_size", "4", "--max-epochs", "1",
                        "--population-num", "3", "--select-num", "2", "--mutation-num", "1",
                        "--crossover-num", "1", "--replicas", "2", cwd=tmp_path)
    assert stage2.returncode == 0, stage2.stderr
    total = block(stage2.stdout, "total-result")
    found = json.loads((tmp_path / "eval-kfold-evolution" / "search_result.json").read_text())
    assert total["archs"] == found["archs"] and total["folds"] == [0, 1]
    stage3 = run_script(str(ROOT / "03finetune.py"), "--data", data, "--supernet", supernet,
                        "--search-result", "eval-kfold-evolution/search_result.json", *MODEL, "-j", "0",
                        "--k", "2", "--val_batch_size", "4", "--bn_epochs", "1", "--iters_per_epoch", "1",
                        "--batch_size", "4", "--replicas", "2", cwd=tmp_path)
    assert stage3.returncode == 0, stage3.stderr
    final = block(stage3.stdout, "final-result")
    assert final["archs"] == found["archs"] and final["full_accs"] == found["full_accs"]
    assert final["**bnfull_accs"] == json.loads(
        (tmp_path / "eval-blast" / "final_result.json").read_text())["bnfull_accs"]
    assert sorted(p.name for p in (tmp_path / "eval-blast").glob("*.pth")) == [
        "arch0_model_actwbin_2_2_bn_0ep.pth", "arch1_model_actwbin_2_2_bn_0ep.pth"]
    for result in (stage1, stage2, stage3):
        assert "Traceback" not in result.stderr

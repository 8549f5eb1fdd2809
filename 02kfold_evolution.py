"""Stage 2: k-fold evolutionary search of one branch per layer (SPEC section 4).

The validation set, in a fixed order, is split by batch index into k folds. On each fold an
evolutionary search finds the branch choice with the best fold accuracy; the winner is then
scored on every other batch ("full accuracy"). Finished folds are saved, so a rerun continues.

    python 02kfold_evolution.py --data {your_imagenet_dataset_folder}
    torchrun --nproc_per_node 8 02kfold_evolution.py --data {your_imagenet_dataset_folder}

Under torchrun the folds are spread over the processes (rank r searches folds r, r + N, ...; each
on its own GPU); rank 0 gathers them into one search_result.json and one printed block. A fold's
search depends on the seed and the fold alone, so the result is that of a single process.

With --rng reference the search draws from the reference's stream instead (numpy's generator seeded
once, folds 0 ... k-1 in sequence on it), which replays the authors' search exactly; fold i then
depends on every earlier fold, so all folds run in one process.

Each evaluated candidate is a line of history.jsonl as it is scored, each epoch's top-k goes to
log.txt, and each fold's search state is saved after every generation: a killed search continues
inside its fold and ends as the uninterrupted one would.
"""
import argparse
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

import utils.torch_floor  # noqa: F401  (first: an older torch stops here, with one line)
from search.draws import FoldDraws, ReferenceDraws
from search.evaluation import Evaluation, evaluation_setup, gather_by_fold
from search.evolution import Candidate, EvolutionSearch, Ranked, uniform_search
from search.files import FoldHistory, check_settings, read_state, state_path, write_state
from search.folds import fold_batches
from search.prefix_scorer import PrefixScorer
from search.results import (
    BLOCK_ROWS,
    fold_record,
    format_block,
    read_fold_record,
    search_result_file,
    write_json,
)
from utils import distributed
from utils.cli import add_eval_args, comma_list, non_negative_int, positive_int, probability, stage_parser
from utils.data import batch_stream, resolution
from utils.errors import DataError, UsageError
from utils.logs import RunLog
from utils.runtime import check_shared_memory, fail_cleanly, load_back_ends, seed_everything, use_tf32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Under torchrun a process that has searched its folds waits for the slowest one: up to a
    # fold's search (an hour or more on ImageNet), hence the long --dist_timeout.
    parser = stage_parser(__doc__, save="eval-kfold-evolution", dist_timeout=24 * 60)
    add_eval_args(parser)
    parser.add_argument("--folds", type=fold_list, default=None,
                        help="search only these folds, e.g. 0,1 (default: all k)")
    parser.add_argument("--max-epochs", type=positive_int, default=20)
    parser.add_argument("--select-num", type=positive_int, default=10)
    parser.add_argument("--population-num", type=positive_int, default=45)
    parser.add_argument("--m_prob", type=probability, default=0.1)
    parser.add_argument("--crossover-num", type=non_negative_int, default=15)
    parser.add_argument("--mutation-num", type=non_negative_int, default=15)
    parser.add_argument("--recalibration_batch_size", type=positive_int, default=128)
    parser.add_argument("--prefix_cache_gb", type=float, default=None,
                        help="memory for the fold's stage outputs, reused by every candidate that "
                             "shares their prefix of branches (same accuracies, less compute; 0: off). "
                             "Used when the validation batches fit in memory. Default: on a GPU what "
                             "the fold leaves free, else 2 (the log says what it chose)")
    parser.add_argument("--rng", choices=("fold", "reference"), default="fold",
                        help="fold: Python's random seeded --seed + fold per fold (folds independent: "
                             "--folds and torchrun work); reference: the reference's stream, numpy's "
                             "seeded once for folds 0..k-1 in sequence, which replays the authors' search")
    parser.add_argument("--leader_full_acc", action="store_true",
                        help="as the reference, compute the full accuracy of each epoch's leader for the "
                             "log (each new leader costs one pass over the validation set outside the fold; "
                             "off: only the winner's)")
    parser.add_argument("--uniform", action="store_true",
                        help="no evolution: score only the selections with one branch (one L2 decay) "
                             "in every layer and keep the best per fold (an ablation)")
    return parser.parse_args(argv)


def search(args: argparse.Namespace) -> dict:
    check_reference_stream(args)
    seed_everything(args.seed)  # seeds 0 for torch, numpy and random, as the reference
    torch.backends.cudnn.deterministic = True  # as the reference: a candidate scores the same each time
    setup = evaluation_setup(args)
    loaders = check_shared_memory(args.workers, max(args.val_batch_size, args.recalibration_batch_size),
                                  resolution(args.base_resolution, args.resolution_multiplier))
    model = setup.model.eval()
    model.change_precision(True, True)
    folds_to_search = args.folds if args.folds is not None else list(range(args.k))
    setup.check_folds(folds_to_search, args.k)
    calibration = []
    if args.bn_recalibration_batches > 0:
        stream = batch_stream(setup.data.train, args.recalibration_batch_size, args.workers, args.seed)
        calibration = [next(stream)[2] for _ in range(args.bn_recalibration_batches)]
    save = Path(args.save)
    stat = Path(args.supernet).stat()  # a retrained supernet is another search
    settings = {"config": setup.config, "supernet": str(args.supernet), "k": args.k,
                "supernet_size_mtime": [stat.st_size, stat.st_mtime_ns],
                "num_batches": setup.num_batches, "seed": args.seed, "rng": args.rng,
                "bn_recalibration_batches": args.bn_recalibration_batches, "uniform": args.uniform,
                **{k: getattr(args, k) for k in ("max_epochs", "select_num", "population_num", "m_prob",
                                                 "crossover_num", "mutation_num", "val_batch_size",
                                                 "replicas")}}
    check_settings(save, settings)
    log = RunLog(save, enabled=distributed.is_main(), tensorboard=False)
    log.info(use_tf32(args.tf32, setup.device))
    log.info(loaders)
    log.info(f"stage 2: {args.supernet} ({setup.config['arch']}, {setup.config['bits']}-bit, "
             f"{model.num_branches} branches), {setup.num_batches} validation batches in {args.k} folds"
             + (f", spread over {distributed.world_size()} processes" if distributed.is_distributed()
                else ""))
    mine = distributed.share(folds_to_search)
    searched = []
    for fold in tqdm(mine, desc="folds", position=0, dynamic_ncols=True, disable=not distributed.is_main()):
        fold_file = save / "folds" / f"fold{fold}.json"
        done = read_fold_record(fold_file, settings)
        if done is not None:
            log.info(f"fold {fold}: finished earlier, kept ({fold_file})")
        else:
            done = search_fold(args, setup, fold, calibration, settings, log)
            write_json(done, fold_file)
            log.info(fold_line(done))
        searched.append(done)
    by_fold = gather_by_fold(searched, log, fold_line)
    result = search_result_file([by_fold[fold] for fold in folds_to_search], settings)
    if distributed.is_main():
        write_json(result, save / "search_result.json")
        print(format_block("total-result", {k: result[k] for k in BLOCK_ROWS}))
    log.info(f"search result: {save / 'search_result.json'}; history: {save / 'history.jsonl'}; "
             f"log: {save / 'log.txt'}")
    log.close()
    return result


def check_reference_stream(args: argparse.Namespace) -> None:
    """--rng reference searches every fold in one process: fold i continues fold i-1's stream."""
    if args.rng != "reference":
        return
    why = "fold i continues the random stream where fold i-1 left it, so it depends on every earlier fold"
    if args.folds is not None and args.folds != list(range(args.k)):
        raise UsageError(f"--rng reference searches folds 0..k-1 in sequence ({why}): drop --folds, "
                         "or use --rng fold")
    if distributed.is_distributed():
        raise UsageError(f"--rng reference runs in one process ({why}): run it with python, not torchrun "
                         f"({distributed.world_size()} processes), or use --rng fold")


def fold_scorers(args: argparse.Namespace, setup: Evaluation, fold: int, calibration: list, log: RunLog
                 ) -> tuple[Callable[[Candidate], float], Callable[[Candidate], float]]:
    """Top-1 of a candidate on the fold, and on every other batch (its full accuracy); the log says
    how the prefix scorer was sized."""
    fold_range, full = fold_batches(setup.num_batches, args.k, fold)
    model = setup.model
    kept = setup.val.kept(fold_range)  # decoded once for all of the fold's candidates
    if kept is not None and args.prefix_cache_gb != 0:  # on the GPU as far as it has room
        cache = None if args.prefix_cache_gb is None else args.prefix_cache_gb * 2**30
        scorer = PrefixScorer.on_device(model, kept, calibration, setup.device, cache, setup.replicas)
        log.info(f"fold {fold}: {scorer.chose}")
        on_fold = scorer.accuracy
    else:
        def on_fold(candidate):
            return setup.accuracy(candidate, kept if kept is not None else setup.val.stream(fold_range),
                                  calibration)

    def on_rest(candidate):
        return setup.accuracy(candidate, setup.val.stream(full), calibration)  # the rest, read once

    return on_fold, on_rest


def fold_draws(args: argparse.Namespace, save: Path, fold: int) -> FoldDraws | ReferenceDraws:
    """The fold's random stream when its search starts: seeded by the seed and the fold, or (--rng
    reference) where the previous fold's search left the reference's stream."""
    if args.rng == "fold":
        return FoldDraws(args.seed + fold)
    draws = ReferenceDraws(args.seed)
    if fold > 0:
        previous = read_state(state_path(save, fold - 1))
        if previous is None:
            raise DataError(f"{state_path(save, fold - 1)} is missing: with --rng reference fold {fold} "
                            f"continues fold {fold - 1}'s stream; remove {save / 'folds'} and "
                            f"{save / 'history.jsonl'} to search again")
        draws.state = previous[0].draws
    return draws


def search_fold(args: argparse.Namespace, setup: Evaluation, fold: int, calibration: list,
                settings: dict, log: RunLog) -> dict:
    """The evolutionary (or ``--uniform``) search on one fold, continued from its saved state; its
    winner's full accuracy."""
    save = Path(args.save)
    model = setup.model
    on_fold, on_rest = fold_scorers(args, setup, fold, calibration, log)
    state_file = state_path(save, fold)
    saved = None if args.uniform else read_state(state_file)
    state, full_accs = saved if saved is not None else (None, {})
    scored = FoldHistory(save, fold, on_fold, state)
    candidates = tqdm(desc=f"fold {fold} candidates", position=1, leave=False, dynamic_ncols=True,
                      disable=not distributed.is_main(), initial=len(state.evaluated) if state else 0)

    def full_acc(candidate: Candidate) -> float:
        if candidate not in full_accs:
            full_accs[candidate] = on_rest(candidate)
        return full_accs[candidate]

    def ranked(epoch: int, top: Ranked) -> None:
        scored.epoch = epoch + 1  # the children bred next enter the next epoch's ranking
        final = epoch == args.max_epochs
        leader = (f", full_acc {full_acc(top[0][0]):.2f}" if final or args.leader_full_acc else "")
        log.info(f"fold {fold} {'final ranking' if final else f'epoch {epoch}/{args.max_epochs}'}: "
                 f"top {len(top)} of {len(search().state.evaluated)} evaluated{leader}\n"
                 + "\n".join(f"  No.{i + 1} {c} fold_acc {acc:.2f}" for i, (c, acc) in enumerate(top)))

    if args.uniform:
        result = uniform_search(model.num_searchable_layers, model.num_branches, scored, candidates)
    else:
        if state is not None:
            log.info(f"fold {fold}: continuing its search at epoch {state.generation}/{args.max_epochs} "
                     f"({len(state.evaluated)} candidates scored, {state_file})")
        evolution = EvolutionSearch(
            model.num_searchable_layers, model.num_branches, scored,
            population_num=args.population_num, select_num=args.select_num,
            mutation_num=args.mutation_num, crossover_num=args.crossover_num, m_prob=args.m_prob,
            max_epochs=args.max_epochs, draws=fold_draws(args, save, fold), progress=candidates,
            state=state, ranked=ranked,
            checkpoint=lambda state: write_state(state_file, state, settings, full_accs))
        # ``ranked`` reads the search through a weak reference: the search holds ``ranked``, and a
        # strong one back would be a cycle that keeps this fold's scorer (its images and prefix cache,
        # GBs on a GPU) alive past its return, until a full garbage collection, into the next fold's
        # room check.
        search = weakref.ref(evolution)
        result = evolution.run()
    candidates.close()
    return fold_record(fold, result.best_acc, full_acc(result.best),
                       list(result.best), result.num_evaluated, settings)


def fold_line(done: dict) -> str:
    return (f"fold {done['fold']}: fold_acc {done['fold_acc']:.2f} full_acc {done['full_acc']:.2f} "
            f"arch {tuple(done['arch'])} ({done['num_candidates']} candidates)")


def fold_list(text: str) -> list[int]:
    return sorted(set(comma_list(text, int, "fold numbers")))


if __name__ == "__main__":
    load_back_ends()  # the CPU back end's fused kernels, where it is there (README, "Speed")
    fail_cleanly(search, parse_args())

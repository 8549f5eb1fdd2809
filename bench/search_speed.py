"""Stage-2 candidates per second: the plain evaluation against the prefix-sharing scorer.

One evolutionary search (stage 2's, with its constants) runs on a random fold; every candidate it
asks for is scored both ways in the same process, alternating which goes first, so machine noise
hits both alike. The accuracies must be identical; the figure of merit is candidates per second.

    python -m bench.search_speed                             # the demo's model, with BN re-estimation
    python -m bench.search_speed --recalibration_batches 0   # the reference's scoring
"""
import argparse

import torch

from bench.timing import timed
from models import build_supernet
from search.bn_recalibration import recalibrate_bn
from search.draws import FoldDraws
from search.evaluation import accuracy_on
from search.evolution import EvolutionSearch
from search.prefix_scorer import PrefixScorer
from utils.runtime import load_back_ends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--branches", type=int, default=7)
    parser.add_argument("--fold_batches", type=int, default=5, help="batches of 200 in the fold")
    parser.add_argument("--recalibration_batches", type=int, default=4, help="of 128 images; 0: off")
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--population-num", type=int, default=45)
    parser.add_argument("--select-num", type=int, default=10)
    parser.add_argument("--mutation-num", type=int, default=15)
    parser.add_argument("--crossover-num", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    l2_vals = [10.0 ** -(1 + 4 * i / max(args.branches - 1, 1)) for i in range(args.branches)]
    model = build_supernet(args.arch, 10, 2, l2_vals, width_multiplier=args.width).to(device)
    model.change_precision(True, True)
    images = lambda n: torch.randn(n, 3, args.size, args.size, device=device)  # noqa: E731
    model.initialize_activation_steps(images(128), [0] * model.num_searchable_layers)
    model.eval()
    fold = [(images(200), torch.randint(0, 10, (200,), device=device)) for _ in range(args.fold_batches)]
    calibration = [(images(128), None) for _ in range(args.recalibration_batches)]
    scorer = PrefixScorer(model, fold, calibration, device)

    def plain(selection) -> float:
        if calibration:
            recalibrate_bn(model, selection, calibration, device)
        return accuracy_on(lambda x: model(x, selection), fold)

    seconds = {"plain": 0.0, "prefix": 0.0}
    count = 0

    def both(selection) -> float:
        nonlocal count
        ways = [("plain", plain), ("prefix", scorer.accuracy)]
        if count % 2:
            ways.reverse()
        accs = {}
        for name, way in ways:
            accs[name], took = timed(lambda way=way: way(selection), device)
            seconds[name] += took
        if accs["plain"] != accs["prefix"]:
            raise SystemExit(f"accuracies differ for {selection}: {accs}")
        count += 1
        return accs["plain"]

    EvolutionSearch(model.num_searchable_layers, model.num_branches, both,
                    population_num=args.population_num, select_num=args.select_num,
                    mutation_num=args.mutation_num, crossover_num=args.crossover_num,
                    max_epochs=args.max_epochs, draws=FoldDraws(0)).run()
    stages = len(model.stages())
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads; "
          f"{args.arch} width {args.width}, {args.size} px, {model.num_branches} branches; fold of "
          f"{args.fold_batches * 200} images, BN re-estimated on {args.recalibration_batches} x 128")
    print(f"{count} candidates, identical accuracies; stage computations {scorer.computed} of "
          f"{count * stages} ({100 * scorer.computed / (count * stages):.0f} %)")
    plain_rate, prefix_rate = count / seconds["plain"], count / seconds["prefix"]
    print(f"candidates/s: plain {plain_rate:.2f}, prefix-sharing {prefix_rate:.2f}, "
          f"speed-up {prefix_rate / plain_rate:.2f}x")


if __name__ == "__main__":
    load_back_ends()  # the CPU back end's fused kernels, where it is there (README, "Speed")
    main()

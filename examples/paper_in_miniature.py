"""The ESFT paper in miniature, on 2 CPU cores in minutes: routing analysis and Tables 1-4 on synthetic domains.

A DeepSeek-V2-shaped MoE (64 routed experts of width 16, top-6, 2 shared experts; and a coarse twin with 32 experts
of width 32, top-3: the same active and total expert parameters) is pre-trained per seed on five domains with
their own words (math, code, law, translation, medicine); law is seen as text only. Every method then learns the
law task from that base; learning rates are tuned per method and seed on a validation split and test accuracy is
reported, with retention (mean test accuracy on the four other domains). See docs/paper_in_miniature.md.

    python examples/paper_in_miniature.py --out results/paper_in_miniature --figures docs/figures
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from esft_peft import ExpertScores, compare_tasks, plot_comparison, plot_scores
from esft_peft.demo.miniature import run_miniature
from esft_peft.demo.report import findings, markdown_report, mean_overlap
from esft_peft.demo.settings import SIZES, load_settings
from esft_peft.files import atomic_write_text
from esft_peft.scoring.plotting import require_matplotlib


def plot_overlap(matrix: dict[str, dict[str, float]], path: Path, title: str) -> None:
    """The domains' overlap matrix (Jaccard index of their selected experts) as an annotated image."""
    Figure = require_matplotlib()
    domains = list(matrix)
    figure = Figure(figsize=(5.2, 4.4))
    axes = figure.add_subplot()
    image = axes.imshow([[matrix[a][b] for b in domains] for a in domains], vmin=0, vmax=1, cmap="viridis")
    for i, a in enumerate(domains):
        for j, b in enumerate(domains):
            axes.text(j, i, f"{matrix[a][b]:.2f}", ha="center", va="center",
                      color="black" if matrix[a][b] > 0.6 else "white", fontsize=8)
    axes.set_xticks(range(len(domains)), domains, rotation=30)
    axes.set_yticks(range(len(domains)), domains)
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, label="Jaccard index")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def write_figures(results: dict, directory: Path) -> list[Path]:
    """From the first seed: token-score heatmaps of every domain (fine experts) and of the target (coarse experts),
    with the selected experts outlined; a two-domain comparison; and, over all seeds, the overlap matrix."""
    directory.mkdir(parents=True, exist_ok=True)
    target = results["target_domain"]
    other = next(domain for domain in results["domains"] if domain != target)
    p = results["top_p"]["token"]
    written = []
    for unit in results["units"]:
        if unit["seed"] != results["seeds"][0]:
            continue
        scores = {domain: ExpertScores.from_dict(data) for domain, data in unit["scores"].items()}
        architecture = unit["architecture"]
        for domain in (results["domains"] if architecture == "fine" else [target]):
            path = directory / f"miniature_{architecture}_{domain}.png"
            plot_scores(scores[domain], path=path, selection=scores[domain].select("token", top_p=p),
                        title=f"{domain} ({architecture} experts, seed {unit['seed']}): token scores, p={p}")
            written.append(path)
        if architecture == "fine":
            path = directory / f"miniature_{target}_vs_{other}.png"
            plot_comparison(compare_tasks(scores[target], scores[other], labels=(target, other)), path)
            written.append(path)
    seeds = sum(unit["architecture"] == "fine" for unit in results["units"])
    if seeds:
        path = directory / "miniature_overlap.png"
        plot_overlap(mean_overlap(results), path, f"Overlap of the token-selected experts (p={p})\n"
                                                  f"mean over layers and {seeds} seeds")
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="paper_in_miniature", help="directory for results.json and tables.md")
    parser.add_argument("--figures", help="directory for the routing figures (default: OUT/figures)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one pre-trained base per seed")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one thread each)")
    parser.add_argument("--size", default="full", choices=SIZES, help="model and step sizes ('quick' to smoke-test)")
    parser.add_argument("--from-results", metavar="JSON", help="redo the tables and figures of an earlier run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    out = Path(args.out)
    if args.from_results:
        results = json.loads(Path(args.from_results).read_text(encoding="utf-8"))
    else:
        results = run_miniature(load_settings(args.size), args.seeds, jobs=args.jobs, log=print)
        atomic_write_text(out / "results.json", json.dumps(results, indent=1))  # kept even if a table fails
    results["findings"] = findings(results)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    report = markdown_report(results)
    atomic_write_text(out / "tables.md", report)
    figures = write_figures(results, Path(args.figures) if args.figures else out / "figures")
    print(report)
    print(f"{results['seconds']:.0f} s; wrote {out / 'results.json'}, {out / 'tables.md'}, "
          + ", ".join(map(str, figures)))


if __name__ == "__main__":
    main()

"""Markdown tables and a findings check for the results of the paper in miniature (``miniature.run_miniature``)."""

from __future__ import annotations

import statistics
from typing import Any, Callable

from .miniature import chosen_rows

MAIN_METHODS = ["Vanilla", "FFT", "LoRA", "ESFT-Token", "ESFT-Gate"]
BUDGET_METHODS = ["ESFT-Gate", "ESFT-Token", "ESFT-Token p=0.4"]
TABLE3_METHODS = ["ESFT-Token", "ESFT-Token +shared", "ESFT-Token +non-expert", "ESFT-Token +both"]
TABLE4_PAIRS = [("ESFT-Token", "ESFT-Token random"), ("ESFT-Gate", "ESFT-Gate random")]
GRANULARITY_METHODS = ["FFT", "ESFT-Token", "ESFT-Gate"]


def mean_sd(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± sd`` (sample standard deviation) of ``values`` times ``scale``."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values) * scale:.{digits}f} ± {spread * scale:.{digits}f}"


def _values(results: dict, architecture: str, method: str, key: str) -> list[float]:
    return [row[key] for row in chosen_rows(results, architecture, method)]


def _mean(results: dict, architecture: str, method: str, key: str) -> float:
    return statistics.mean(_values(results, architecture, method, key))


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def accuracy_table(results: dict, methods: list[str], architecture: str = "fine") -> str:
    """Target-task accuracy and retention (mean ± sd over seeds, %) with the trained experts and parameters."""
    target = results["target_domain"]
    rows = []
    for method in methods:
        rows.append([
            method, mean_sd(_values(results, architecture, method, "target")),
            mean_sd(_values(results, architecture, method, "retention")),
            f"{_mean(results, architecture, method, 'experts'):.1f}",
            f"{_mean(results, architecture, method, 'trained_parameters'):,.0f}",
        ])
    return _table(["method", f"{target} (target) acc. %", "retention on the other domains %", "trained experts",
                   "trained params"], rows)


def efficiency_table(results: dict, architecture: str = "fine") -> str:
    """Table 2: trained parameters, their share, the artifact they make (float32), and training time."""
    rows = []
    for method in MAIN_METHODS[1:]:
        parameters = _mean(results, architecture, method, "trained_parameters")
        rows.append([
            method, f"{parameters:,.0f}", f"{_mean(results, architecture, method, 'trained_fraction'):.2%}",
            f"{parameters * 4 / 1024:,.1f}", mean_sd(_values(results, architecture, method, "seconds"), 1.0),
        ])
    return _table(["method", "trained params", "of the model", "artifact KiB (fp32)", "train time s"], rows)


def random_table(results: dict, architecture: str = "fine") -> str:
    """Table 4: the selected experts against as many random experts per layer."""
    rows = []
    for selected, random in TABLE4_PAIRS:
        for method in (selected, random):
            rows.append([method, mean_sd(_values(results, architecture, method, "target")),
                         mean_sd(_values(results, architecture, method, "retention")),
                         f"{_mean(results, architecture, method, 'experts'):.1f}"])
    return _table(["method", "target acc. %", "retention %", "trained experts"], rows)


def budget_table(results: dict, architecture: str = "fine") -> str:
    """ESFT at growing budgets: experts trained, share of the target's answer tokens they see, accuracy, retention."""
    rows = []
    for method in BUDGET_METHODS:
        rows.append([method, f"{_mean(results, architecture, method, 'experts'):.1f}",
                     mean_sd(_values(results, architecture, method, "coverage")),
                     mean_sd(_values(results, architecture, method, "target")),
                     mean_sd(_values(results, architecture, method, "retention"))])
    return _table(["method", "trained experts", "target answer tokens reaching a trained expert %",
                   "target acc. %", "retention %"], rows)


def granularity_table(results: dict) -> str:
    """Fine-grained against coarse experts (same active and total expert parameters)."""
    rows = []
    for architecture in ("fine", "coarse"):
        model = results["architectures"][architecture]
        label = (f"{architecture}: {model['n_routed_experts']} routed, top-{model['num_experts_per_tok']}, "
                 f"width {model['moe_intermediate_size']}")
        for method in GRANULARITY_METHODS:
            rows.append([label, method, mean_sd(_values(results, architecture, method, "target")),
                         mean_sd(_values(results, architecture, method, "retention")),
                         f"{_mean(results, architecture, method, 'experts'):.1f}",
                         f"{_mean(results, architecture, method, 'trained_parameters'):,.0f}"])
    return _table(["experts", "method", "target acc. %", "retention %", "trained experts", "trained params"], rows)


def routing_table(results: dict, architecture: str = "fine") -> str:
    """Concentration per domain (means over layers, then mean ± sd over seeds), at initialisation and pre-trained."""
    units = [unit for unit in results["units"] if unit["architecture"] == architecture]
    rows = []
    for domain in results["domains"]:
        stage = lambda name, key: [unit["routing"][name]["tasks"][domain][key] for unit in units]  # noqa: E731
        first = units[0]["routing"]["token"]["tasks"][domain]
        rows.append([
            domain, f"top-{first['top_k']}: {mean_sd(stage('initial', 'top_share'))}",
            mean_sd(stage("token", "top_share")), f"{first['uniform_share']:.1%}",
            f"{statistics.mean(stage('token', 'experts_to_p')):.1f}",
            f"{statistics.mean(stage('gate', 'experts_to_p')):.1f}",
        ])
    return _table(["domain", "share of routed pairs held by the top experts, at init %", "pre-trained %",
                   "uniform", f"experts/layer to token p={results['top_p']['token']}",
                   f"experts/layer to gate p={results['top_p']['gate']}"], rows)


def mean_overlap(results: dict, architecture: str = "fine") -> dict[str, dict[str, float]]:
    """Jaccard overlap of the token-selected experts of every pair of domains, mean over layers and seeds."""
    units = [unit for unit in results["units"] if unit["architecture"] == architecture]
    domains = results["domains"]
    return {a: {b: statistics.mean(u["routing"]["token"]["overlap"][a][b] for u in units) for b in domains}
            for a in domains}


def overlap_table(results: dict, architecture: str = "fine") -> str:
    """:func:`mean_overlap` as a table."""
    matrix = mean_overlap(results, architecture)
    return _table(["overlap"] + list(matrix), [[a] + [f"{v:.2f}" for v in row.values()] for a, row in matrix.items()])


def learning_rate_table(results: dict) -> str:
    """The learning rate chosen on the validation split, per method and seed."""
    rows = []
    for architecture in results["architectures"]:
        units = [unit for unit in results["units"] if unit["architecture"] == architecture]
        for method in dict.fromkeys(row["method"] for unit in units for row in unit["rows"]):
            if method != "Vanilla":
                picks = [f"{row['learning_rate']:g}" for row in chosen_rows(results, architecture, method)]
                rows.append([architecture, method, ", ".join(picks)])
    return _table(["experts", "method", "chosen lr per seed"], rows)


def per_seed_table(results: dict) -> str:
    """Target / retention accuracy (%) of every tuned method for every seed."""
    rows = []
    for unit in results["units"]:
        for row in unit["rows"]:
            if row["chosen"]:
                rows.append([unit["architecture"], str(unit["seed"]), row["method"],
                             "-" if row["learning_rate"] is None else f"{row['learning_rate']:g}",
                             f"{row['target']:.1%}", f"{row['retention']:.1%}",
                             "-" if row["validation"] is None else f"{row['validation']:.1%}"])
    return _table(["experts", "seed", "method", "lr", "target (test)", "retention (test)", "target (validation)"],
                  rows)


def findings(results: dict) -> list[dict[str, Any]]:
    """The paper's claims, checked against the measured means (each with the numbers it rests on)."""
    m = lambda method, key, architecture="fine": _mean(results, architecture, method, key)  # noqa: E731
    units = [unit for unit in results["units"] if unit["architecture"] == "fine"]
    share = statistics.mean(unit["routing"]["token"]["tasks"][d]["top_share"] for unit in units
                            for d in results["domains"])
    uniform = units[0]["routing"]["token"]["tasks"][results["domains"][0]]["uniform_share"]
    target = results["target_domain"]
    overlaps = [unit["routing"]["token"]["overlap"][target][d] for unit in units for d in results["domains"]
                if d != target]
    claims: list[tuple[str, bool, str]] = [
        ("Routing concentrates: a task's top experts hold far more than a uniform share", share > 2 * uniform,
         f"top-k share {share:.1%} vs uniform {uniform:.1%}"),
        ("Different tasks select different experts", statistics.mean(overlaps) < 0.5,
         f"mean Jaccard of {target} with the others {statistics.mean(overlaps):.2f}"),
    ]
    for method in ("ESFT-Token", "ESFT-Gate"):
        claims += [
            (f"{method} nearly matches FFT on the task (within 5 points)",
             m(method, "target") >= m("FFT", "target") - 0.05,
             f"{m(method, 'target'):.1%} vs FFT {m('FFT', 'target'):.1%}"),
            (f"{method} retains more than FFT and LoRA",
             m(method, "retention") > max(m("FFT", "retention"), m("LoRA", "retention")),
             f"{m(method, 'retention'):.1%} vs FFT {m('FFT', 'retention'):.1%}, LoRA {m('LoRA', 'retention'):.1%}"),
            (f"{method}'s experts beat random experts at the same budget on the task",
             m(method, "target") > m(f"{method} random", "target"),
             f"{m(method, 'target'):.1%} vs {m(f'{method} random', 'target'):.1%}"),
        ]
    claims.append(("ESFT-Token beats LoRA on the task", m("ESFT-Token", "target") > m("LoRA", "target"),
                   f"{m('ESFT-Token', 'target'):.1%} vs {m('LoRA', 'target'):.1%}"))
    for variant in TABLE3_METHODS[1:]:
        claims.append((f"{variant}: retains less than ESFT-Token",
                       m(variant, "retention") < m("ESFT-Token", "retention"),
                       f"{m(variant, 'retention'):.1%} vs {m('ESFT-Token', 'retention'):.1%} "
                       f"(task {m(variant, 'target'):.1%} vs {m('ESFT-Token', 'target'):.1%})"))
    claims.append(("ESFT trains far fewer parameters and less time than FFT",
                   m("ESFT-Token", "trained_parameters") < 0.2 * m("FFT", "trained_parameters")
                   and m("ESFT-Token", "seconds") < m("FFT", "seconds"),
                   f"{m('ESFT-Token', 'trained_fraction'):.1%} of the parameters; {m('ESFT-Token', 'seconds'):.1f} s "
                   f"vs {m('FFT', 'seconds'):.1f} s"))
    if ran(results, "coarse", GRANULARITY_METHODS):
        for key, what in (("target", "task accuracy"), ("retention", "retention")):
            change = {method: m(method, key, "coarse") - m(method, key) for method in ("ESFT-Token", "FFT")}
            claims.append((f"Coarse experts cost ESFT more {what} than FFT", change["ESFT-Token"] < change["FFT"],
                           f"fine -> coarse: ESFT-Token {m('ESFT-Token', key):.1%} -> "
                           f"{m('ESFT-Token', key, 'coarse'):.1%}, FFT {m('FFT', key):.1%} -> "
                           f"{m('FFT', key, 'coarse'):.1%}"))
    return [{"claim": claim, "holds": holds, "measured": measured} for claim, holds, measured in claims]


def findings_table(results: dict) -> str:
    return _table(["paper's finding", "holds here?", "measured (means over seeds)"],
                  [[f["claim"], "yes" if f["holds"] else "**no**", f["measured"]] for f in findings(results)])


def ran(results: dict, architecture: str, methods: list[str] = ()) -> bool:
    """Whether ``results`` hold ``architecture`` units in which every one of ``methods`` was run."""
    units = [unit for unit in results["units"] if unit["architecture"] == architecture]
    return bool(units) and all(any(row["method"] == method for row in unit["rows"]) for unit in units
                               for method in methods)


FINDINGS_METHODS = MAIN_METHODS[1:] + [random for _, random in TABLE4_PAIRS] + TABLE3_METHODS[1:]
SECTIONS: list[tuple[str, Callable[[dict], str], Callable[[dict], bool]]] = [
    ("Routing concentration (fine-grained experts)", routing_table, lambda r: ran(r, "fine")),
    ("Routing concentration (coarse experts)", lambda r: routing_table(r, "coarse"), lambda r: ran(r, "coarse")),
    ("Overlap of the selected experts between domains (fine-grained)", overlap_table, lambda r: ran(r, "fine")),
    ("Table 1: target task and retention", lambda r: accuracy_table(r, MAIN_METHODS),
     lambda r: ran(r, "fine", MAIN_METHODS[1:])),
    ("Table 2: efficiency", efficiency_table, lambda r: ran(r, "fine", MAIN_METHODS[1:])),
    ("Table 3: also training shared experts or non-expert modules", lambda r: accuracy_table(r, TABLE3_METHODS),
     lambda r: ran(r, "fine", TABLE3_METHODS)),
    ("Table 4: selected against random experts", random_table,
     lambda r: ran(r, "fine", [m for pair in TABLE4_PAIRS for m in pair])),
    ("Selection budget", budget_table, lambda r: ran(r, "fine", BUDGET_METHODS)),
    ("Expert granularity", granularity_table,
     lambda r: ran(r, "fine", GRANULARITY_METHODS) and ran(r, "coarse", GRANULARITY_METHODS)),
    ("Learning rates chosen on the validation split", learning_rate_table, lambda r: True),
    ("The paper's findings at this scale", findings_table, lambda r: ran(r, "fine", FINDINGS_METHODS)),
    ("Per seed", per_seed_table, lambda r: True),
]


def markdown_report(results: dict) -> str:
    """Every table whose methods were run, as Markdown sections."""
    return "\n".join(f"### {title}\n\n{render(results)}\n" for title, render, available in SECTIONS
                     if available(results))

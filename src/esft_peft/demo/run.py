"""The built-in, offline ESFT demo: ``esft-peft demo --out DIR``.

Pre-trains a small DeepSeek-V2-shaped MoE (64 fine-grained routed experts, top-6, and 2 shared experts per MoE
layer) on five synthetic domains, where the target domain ("law") is seen only as text, never as a task. Then,
from that same base and for the same number of steps, it fine-tunes the law task twice: with ESFT (score the
experts on law data, select them with the paper's top-p rule, train only those) and with full fine-tuning. It
prints both side by side (law accuracy, retention of the other domains, trained parameters, artifact size) and
writes the scores, the heatmap, the expert config, the adapter, the merged model and ``results.json``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..defaults import EXPERT_CONFIG_NAME
from . import synthetic_tasks as st
from .methods import METHODS, demo_method, prepare, select_experts
from ..quiet import quiet_libraries
from .settings import load_settings
from .routing import selection_coverage
from .training import count_parameters, finetuning_stream, pretrain_base, score_domain, scoring_batch, train_loop

DEMO_THREADS = 1  # the demo model is tiny: one thread is as fast as two, and far faster on a busy machine
OUTPUTS = ("base", "adapter", "merged", "scores.json", "heatmap.png", EXPERT_CONFIG_NAME, "results.json")
MINIATURE_DOC = "docs/paper_in_miniature.md"


def check_out_dir(out: Path) -> None:
    """Refuse a directory that holds files the demo does not write (they would be mixed with, or lost among, its
    outputs)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory; pass a new or empty directory to --out.")
    foreign = sorted(entry.name for entry in out.iterdir() if entry.name not in OUTPUTS) if out.exists() else []
    if foreign:
        raise FileExistsError(
            f"{out} holds files the demo does not write ({', '.join(foreign[:5])}); pass a new or empty directory "
            "to --out (a directory of an earlier demo run is fine: its outputs are replaced)."
        )


def run_demo(out_dir: str | Path, size: str = "full", seed: int = 0, progress: bool = True, **overrides: Any) -> dict:
    """Run the whole demo on ``DEMO_THREADS`` CPU threads; writes its outputs under ``out_dir`` and returns the
    measured results (also written to ``out_dir/results.json``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(DEMO_THREADS)
    try:
        with quiet_libraries():
            return _run_demo(Path(out_dir), size, seed, progress, **overrides)
    finally:
        torch.set_num_threads(threads)


def _row(accuracy: dict[str, float], target: str) -> dict[str, Any]:
    return {"accuracy": accuracy, "target": accuracy[target], "retention": st.retention(accuracy, target)}


def _run_demo(out: Path, size: str, seed: int, progress: bool, **overrides: Any) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..files import atomic_directory_write, atomic_write_text
    from ..interop.hub import write_model_card
    from ..scoring.plotting import plot_scores

    started = time.perf_counter()
    settings = load_settings(size, **overrides)
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    target = settings.target_domain
    cache: dict = {}

    def evaluate(model: nn.Module) -> dict[str, float]:
        return st.evaluate_domains(model, tokenizer, settings.domains, settings.eval_examples,
                                   length=settings.sequence_words, cache=cache)

    base, tokenizer = pretrain_base(settings, seed, progress=progress)
    base_parameters = count_parameters(base)
    rows = {"base": _row(evaluate(base), target)}

    def save_base(tmp: Path) -> None:
        base.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_directory_write(out / "base", save_base, overwrite=True)
    base.name_or_path = str((out / "base").resolve())  # recorded as the adapter's base model

    scores = score_domain(base, tokenizer, settings, target, seed)
    scores.save(out / "scores.json")
    top_p = settings.demo_top_p
    method = demo_method(top_p)
    experts = select_experts(method, scores, seed)
    coverage = selection_coverage(base, scoring_batch(tokenizer, settings, target, seed), experts)
    plot_scores(scores, path=out / "heatmap.png", selection=experts,
                title=f"{target}: token scores of the base, {sum(map(len, experts.values()))} experts selected "
                      f"(p={top_p})")

    trained: dict[str, nn.Module] = {}
    for key, trained_method, desc in (("ESFT", method, "ESFT"), ("FFT", METHODS["FFT"], "full fine-tuning")):
        model = prepare(trained_method, base, scores, seed)
        lr = settings.learning_rates[trained_method.family]
        tick = time.perf_counter()
        losses = train_loop(model, finetuning_stream(tokenizer, settings, seed), settings.finetune_steps, lr,
                            weight_decay=0.1, desc=desc, progress=progress)
        seconds = time.perf_counter() - tick
        parameters = count_parameters(model, trainable=True)
        rows[key] = {"method": trained_method.name, **_row(evaluate(model), target), "learning_rate": lr, "trained_parameters": parameters,
                      "trained_fraction": parameters / base_parameters, "seconds": round(seconds, 2),
                      "loss": {"first": losses[0], "last": statistics.mean(losses[-5:])}}
        trained[key] = model
    esft = trained["ESFT"]
    esft.peft_config["default"].save_expert_config(out / EXPERT_CONFIG_NAME)

    def save_adapter(tmp: Path) -> None:
        esft.save_pretrained(tmp)
        write_model_card(esft, tmp)

    atomic_directory_write(out / "adapter", save_adapter, overwrite=True)
    rows["ESFT"]["artifact_bytes"] = (out / "adapter" / "adapter_model.safetensors").stat().st_size
    # A full fine-tune is stored as a whole model: the same tensors as the base, so the same file size.
    rows["FFT"]["artifact_bytes"] = (out / "base" / "model.safetensors").stat().st_size

    fresh = AutoModelForCausalLM.from_pretrained(out / "base")
    reloaded = PeftModel.from_pretrained(fresh, out / "adapter").eval()
    reloaded_accuracy = evaluate(reloaded)
    merged = reloaded.merge_and_unload()

    def save_merged(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_directory_write(out / "merged", save_merged, overwrite=True)
    merged_accuracy = evaluate(AutoModelForCausalLM.from_pretrained(out / "merged").eval())

    config = base.config
    results = {
        "size": size,
        "seed": seed,
        "target_domain": target,
        "domains": settings.domains,
        "model": {"moe_layers": len(scores.layers), "routed_experts": config.n_routed_experts,
                  "experts_per_token": config.num_experts_per_tok, "shared_experts": config.n_shared_experts,
                  "parameters": base_parameters},
        "pretrain_steps": settings.pretrain_steps,
        "finetune_steps": settings.finetune_steps,
        "finetune_batch_size": settings.finetune_batch_size,
        "score_function": method.score_function,
        "top_p": top_p,
        "experts": experts,
        "coverage": coverage,
        "rows": rows,
        "reloaded": reloaded_accuracy,
        "merged": merged_accuracy,
        "files": [],
        "seconds": round(time.perf_counter() - started, 1),
    }
    results["files"] = sorted({*_files(out), "results.json"})
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    return results


def _files(out: Path) -> list[str]:
    """The demo's output files under ``out``, relative to it."""
    files = []
    for name in OUTPUTS:
        path = out / name
        if path.is_file():
            files.append(name)
        elif path.is_dir():
            files += [item.relative_to(out).as_posix() for item in path.rglob("*") if item.is_file()]
    return files


def summary_sentence(results: dict) -> str:
    """One sentence on what the numbers mean, written from the numbers (whichever way they go)."""
    target = results["target_domain"]
    esft, fft = results["rows"]["ESFT"], results["rows"]["FFT"]
    learned = esft["target"] >= fft["target"] - 0.05
    retained = esft["retention"] > fft["retention"] + 0.05
    share = f"{esft['trained_fraction']:.1%} of the parameters"
    if learned and retained:
        return (f"ESFT learned {target} as well as full fine-tuning ({esft['target']:.0%} vs {fft['target']:.0%}) "
                f"while training {share}, and kept {esft['retention']:.0%} mean accuracy on the other domains against "
                f"{fft['retention']:.0%}: it changed only the experts {target} is routed to.")
    if learned:
        outcome = ("retained less of the other domains" if esft["retention"] < fft["retention"] - 0.05
                   else "did not retain the other domains better")
        return (f"ESFT learned {target} as well as full fine-tuning ({esft['target']:.0%} vs {fft['target']:.0%}) "
                f"while training {share}, but in this run it {outcome} ({esft['retention']:.0%} vs "
                f"{fft['retention']:.0%}).")
    return (f"In this run ESFT learned {target} less well than full fine-tuning ({esft['target']:.0%} vs "
            f"{fft['target']:.0%}) in the same steps; retention of the other domains: {esft['retention']:.0%} vs "
            f"{fft['retention']:.0%}.")


def format_report(results: dict, out_dir: str | Path) -> str:
    """The demo's printed report: the side-by-side table, the sentence, the pointer and the files written."""
    target = results["target_domain"]
    rows = results["rows"]
    base, esft, fft = rows["base"], rows["ESFT"], rows["FFT"]
    model = results["model"]
    selected = sum(len(ids) for ids in results["experts"].values())
    lines = [
        f"Model: DeepSeek-V2-style MoE, {model['moe_layers']} MoE layers of {model['routed_experts']} routed experts "
        f"(top-{model['experts_per_token']}) + {model['shared_experts']} shared, {model['parameters']:,} parameters, "
        f"pre-trained on {', '.join(results['domains'])} ({target} as text only).",
        f"Fine-tuned on the {target} task from the same base, {results['finetune_steps']} steps each "
        f"(seed {results['seed']}):",
        "",
        f"{'':<24}{'base':>10}{esft['method']:>18}{'full FT':>18}",
    ]
    for domain in [target] + [d for d in results["domains"] if d != target]:
        label = f"{domain} ({'target task' if domain == target else 'retention'})"
        lines.append(f"{label:<24}{base['accuracy'][domain]:>10.1%}{esft['accuracy'][domain]:>18.1%}"
                     f"{fft['accuracy'][domain]:>18.1%}")
    lines += [
        f"{'retention (mean)':<24}{base['retention']:>10.1%}{esft['retention']:>18.1%}{fft['retention']:>18.1%}",
        f"{'trained parameters':<24}{'-':>10}{esft['trained_parameters']:>18,}{fft['trained_parameters']:>18,}",
        f"{'trained fraction':<24}{'-':>10}{esft['trained_fraction']:>18.2%}{fft['trained_fraction']:>18.0%}",
        f"{'artifact size':<24}{'-':>10}{esft['artifact_bytes'] / 1024:>14.1f} KiB"
        f"{fft['artifact_bytes'] / 1024:>14.1f} KiB",
        f"{'learning rate':<24}{'-':>10}{esft['learning_rate']:>18g}{fft['learning_rate']:>18g}",
        "",
        summary_sentence(results),
        f"ESFT trained {selected} of {model['routed_experts'] * model['moe_layers']} routed experts "
        f"({results['score_function']} scores, p={results['top_p']}): {results['experts']}; "
        f"{results['coverage']['any']:.0%} of the {target} answer tokens are routed to at least one of them "
        "(ESFT can change only what those experts compute).",
        "Reloaded adapter and merged model give ESFT's accuracies: "
        f"{'yes' if results['reloaded'] == results['merged'] == esft['accuracy'] else 'NO'}.",
        f"Every method of the paper over 3 seeds, and why: {MINIATURE_DOC}",
        f"Files written under {out_dir} ({results['seconds']:.0f} s):",
        *(f"  {name}" for name in results["files"]),
    ]
    return "\n".join(lines)


def main(out_dir: str, size: str = "full", seed: int = 1, progress: bool = True) -> dict:
    """Run the demo and print its report (used by ``esft-peft demo``)."""
    results = run_demo(out_dir, size=size, seed=seed, progress=progress)
    print(format_report(results, out_dir))
    return results

"""The built-in demo, its synthetic domains, the routing analysis and the paper in miniature (quick sizes)."""

import json
import random
import subprocess
import sys

import pytest

from esft_peft import ExpertScores
from esft_peft.demo import synthetic_tasks as st
from esft_peft.demo.methods import METHODS, prepare
from esft_peft.demo.miniature import pick_learning_rate, run_unit
from esft_peft.demo.report import markdown_report
from esft_peft.quiet import quiet_libraries
from esft_peft.demo.routing import overlap_matrix, routing_summary, selection_coverage, top_share
from esft_peft.demo.run import check_out_dir, summary_sentence
from esft_peft.demo.settings import load_settings
from esft_peft.demo.training import build_model, count_parameters, score_domain, scoring_batch

MARKER = "--- demo starts ---"
# Imports first (a library may log at import in some environments, e.g. bitsandbytes without `kernels`); from the
# marker on, everything the demo emits is checked. Every warning is shown, none is filtered by default.
DEMO_SCRIPT = f"""
import sys, warnings
from esft_peft.cli import main
warnings.simplefilter("always")
print({MARKER!r}, file=sys.stderr, flush=True)
sys.exit(main(["demo", "--out", sys.argv[1], "--quick"]))
"""


def test_quick_demo_side_by_side_without_warnings(tmp_path):
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", DEMO_SCRIPT, str(run)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.split(MARKER, 1)[1].strip() == "", done.stderr  # no warning, no progress bar (not a terminal)
    out = done.stdout
    assert "warn" not in out.lower() and "\r" not in out
    assert "ESFT-Token" in out and "full FT" in out and "law (target task)" in out and "math (retention)" in out
    assert "retention (mean)" in out and "trained fraction" in out and "artifact size" in out
    assert "docs/paper_in_miniature.md" in out
    assert "Reloaded adapter and merged model give ESFT's accuracies: yes" in out

    results = json.loads((run / "results.json").read_text())
    assert set(results["rows"]) == {"base", "ESFT", "FFT"}
    assert results["rows"]["ESFT"]["method"] == "ESFT-Token p=0.4" and results["top_p"] == 0.4
    for name in ("ESFT", "FFT"):
        row = results["rows"][name]
        assert set(row["accuracy"]) == set(results["domains"]) == set(st.DOMAINS)
        assert row["target"] == row["accuracy"]["law"]
        assert row["retention"] == pytest.approx(sum(v for d, v in row["accuracy"].items() if d != "law") / 4)
        assert row["learning_rate"] > 0 and row["artifact_bytes"] > 0 and row["loss"]["last"] < row["loss"]["first"]
    esft, fft = results["rows"]["ESFT"], results["rows"]["FFT"]
    assert fft["trained_fraction"] == 1.0 and 0 < esft["trained_fraction"] < 0.5
    assert esft["artifact_bytes"] < fft["artifact_bytes"]
    assert results["reloaded"] == results["merged"] == esft["accuracy"]
    assert json.loads((run / "expert_cfg.json").read_text())["experts"] == results["experts"]
    written = sorted(path.relative_to(run).as_posix() for path in run.rglob("*") if path.is_file())
    assert results["files"] == written
    for name in written:
        assert f"  {name}" in out
    assert {"heatmap.png", "scores.json", "adapter/adapter_model.safetensors", "merged/model.safetensors"} <= {*written}


def test_demo_refuses_a_directory_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        check_out_dir(tmp_path)
    check_out_dir(tmp_path / "new")  # absent: fine
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "results.json").write_text("{}")
    check_out_dir(tmp_path / "new")  # an earlier demo run: fine


def _results(esft_target, esft_retention, fft_target=1.0, fft_retention=0.2):
    row = lambda t, r: {"target": t, "retention": r, "trained_fraction": 0.03}  # noqa: E731
    return {"target_domain": "law", "rows": {"ESFT": row(esft_target, esft_retention),
                                             "FFT": row(fft_target, fft_retention)}}


def test_summary_sentence_says_what_happened():
    assert "kept 90% mean accuracy on the other domains against 20%" in summary_sentence(_results(1.0, 0.9))
    assert "did not retain the other domains better (22% vs 20%)" in summary_sentence(_results(1.0, 0.22))
    assert "it retained less of the other domains (70% vs 79%)" in summary_sentence(_results(1.0, 0.70, 1.0, 0.79))
    assert "learned law less well than full fine-tuning (50% vs 100%)" in summary_sentence(_results(0.5, 0.9))


def test_domains_have_own_words_shared_digits_and_disjoint_splits():
    vocabulary = st.vocabulary()
    digit_tasks = st.SPECIAL_TOKENS + st.DIGITS + [st.task_tag(t) for t in st.TASKS]
    assert vocabulary[: len(digit_tasks)] == digit_tasks  # the digit tasks' token ids are unchanged
    words = [set(words) for words in st.DOMAIN_WORDS.values()]
    assert all(a.isdisjoint(b) for i, a in enumerate(words) for b in words[i + 1:])
    for domain in st.DOMAINS:
        dictionary = st.domain_dictionary(domain)
        assert sorted(dictionary.values()) == sorted(st.DOMAIN_WORDS[domain])
    rng = random.Random(0)
    prompts = {split: {st.make_domain_example("law", rng, split=split)[0] for _ in range(200)} for split in st.SPLITS}
    assert all(st.split_of(p) == split for split, ps in prompts.items() for p in ps)
    assert prompts["train"].isdisjoint(prompts["test"]) and prompts["validation"].isdisjoint(prompts["test"])
    prompt, answer = st.make_domain_example("law", random.Random(1), length=8, echo=True)
    assert answer.split()[:-1] == prompt.split()[1:-1]
    prompt, answer = st.make_domain_example("code", random.Random(1), length=8)
    dictionary = st.domain_dictionary("code")
    assert answer.split()[:-1] == [dictionary.get(x, x) for x in prompt.split()[1:-1]]


def _scores(token, top_k=2, gate=None):
    return ExpertScores(token_scores=token, gate_scores=gate or token, top_k=top_k)


def test_routing_concentration_and_overlap_by_hand():
    scores = _scores({"1": [0.5, 0.3, 0.1, 0.1], "2": [0.25, 0.25, 0.25, 0.25]})
    assert top_share(scores) == pytest.approx({"1": 0.8, "2": 0.5})
    assert top_share(scores, k=1) == pytest.approx({"1": 0.5, "2": 0.25})
    matrix = overlap_matrix({"a": {"1": [0, 1], "2": [0]}, "b": {"1": [1, 2], "2": [3]}, "c": {"1": [0, 1], "2": [0]}})
    assert matrix["a"]["b"] == pytest.approx((1 / 3 + 0) / 2) and matrix["b"]["a"] == matrix["a"]["b"]
    assert matrix["a"]["c"] == 1.0 and matrix["a"]["a"] == 1.0
    other = _scores({"1": [0.0, 0.1, 0.2, 0.7], "2": [0.7, 0.1, 0.1, 0.1]})
    summary = routing_summary({"x": scores, "y": other}, "token", top_p=0.6)
    x = summary["tasks"]["x"]
    assert x["top_share"] == pytest.approx(0.65) and x["uniform_share"] == 0.5
    assert x["experts_to_p"] == pytest.approx((2 + 3) / 2)  # layer 1: 0.5+0.3; layer 2: three quarters
    assert summary["selections"]["y"] == {"1": [3], "2": [0]}
    assert summary["overlap"]["x"]["y"] == pytest.approx((0 + 1 / 3) / 2)  # {0,1} vs {3}; {0,1,2} vs {0}


def test_selection_coverage_matches_the_expert_counts():
    settings = load_settings("quick")
    model, tokenizer = build_model(settings, seed=0), st.build_tokenizer()
    scores = score_domain(model, tokenizer, settings, "law")
    batch = scoring_batch(tokenizer, settings, "law")
    tokens, counts = scores.token_counts["0"], scores.expert_counts["0"]
    assert tokens == int((batch["labels"] != -100).sum())
    for expert in range(settings.model["n_routed_experts"]):
        coverage = selection_coverage(model, batch, {"0": [expert]})
        assert coverage == {"0": counts[expert] / tokens, "any": counts[expert] / tokens}
    assert selection_coverage(model, batch, {"0": list(range(8))}) == {"0": 1.0, "any": 1.0}
    pair = selection_coverage(model, batch, {"0": [0, 1]})["0"]
    assert max(counts[0], counts[1]) / tokens <= pair <= (counts[0] + counts[1]) / tokens


def test_pick_learning_rate_takes_the_smallest_within_tolerance():
    assert pick_learning_rate({1e-4: 0.5, 3e-4: 0.995, 1e-3: 1.0}) == 3e-4
    assert pick_learning_rate({1e-4: 0.5, 3e-4: 0.9, 1e-3: 1.0}) == 1e-3
    assert pick_learning_rate({1e-4: 0.0, 3e-4: 0.0}) == 1e-4
    with pytest.raises(ValueError):
        pick_learning_rate({})


def test_methods_train_what_the_paper_says():
    settings = load_settings("quick")
    base = build_model(settings, seed=0)
    scores = score_domain(base, st.build_tokenizer(), settings, "law")
    total = count_parameters(base)
    with quiet_libraries():
        trained = {name: count_parameters(prepare(method, base, scores), trainable=True)
                   for name, method in METHODS.items()}
    assert trained["FFT"] == total and 0 < trained["LoRA"] < total
    assert trained["ESFT-Token random"] == trained["ESFT-Token"] < trained["ESFT-Token +shared"]
    assert trained["ESFT-Token +shared"] < trained["ESFT-Token +both"]
    assert trained["ESFT-Token"] < trained["ESFT-Token +non-expert"] < trained["ESFT-Token +both"]
    assert count_parameters(base, trainable=True) == total  # prepare works on copies


def test_miniature_unit_tunes_on_validation_and_reports(tmp_path):
    settings = load_settings("quick")
    unit = run_unit(settings, "fine", seed=0, methods=["FFT", "ESFT-Token", "ESFT-Token random"], log=lambda _: None)
    rows = [row for row in unit["rows"] if row["method"] == "ESFT-Token"]
    assert [row["learning_rate"] for row in rows] == settings.learning_rate_grids["ESFT"]
    assert sum(row["chosen"] for row in rows) == 1
    chosen = next(row for row in rows if row["chosen"])
    assert chosen["learning_rate"] == pick_learning_rate({r["learning_rate"]: r["validation"] for r in rows})
    assert set(unit["routing"]) == {"initial", "token", "gate"}
    assert set(unit["routing"]["token"]["overlap"]) == set(settings.domains)
    results = {"seeds": [0], "architectures": {"fine": settings.model}, "domains": settings.domains,
               "target_domain": settings.target_domain, "top_p": {"token": 0.2, "gate": 0.1}, "units": [unit]}
    report = markdown_report(results)
    assert "Routing concentration (fine-grained experts)" in report and "Per seed" in report
    assert "| fine | 0 | ESFT-Token |" in report
    json.loads(json.dumps(unit))  # every row is JSON-serialisable


def test_coarse_twin_has_the_same_expert_parameters():
    settings = load_settings("full")
    fine, coarse = build_model(settings, seed=0), build_model(settings, seed=0, coarse=True)

    def expert_parameters(model, part):
        return sum(p.numel() for layer in model.model.layers[settings.model["first_k_dense_replace"]:]
                   for p in getattr(layer.mlp, part).parameters())

    for part in ("experts", "shared_experts"):
        assert expert_parameters(fine, part) == expert_parameters(coarse, part)
    fine_config, coarse_config = fine.config, coarse.config
    active = lambda c: c.num_experts_per_tok * c.moe_intermediate_size  # noqa: E731
    assert active(fine_config) == active(coarse_config)
    assert coarse_config.n_routed_experts < fine_config.n_routed_experts

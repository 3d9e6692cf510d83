"""Expert relevance scoring, selection, files, pictures and errors (issue #3)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_families import make_model

from esft_peft import ESFTConfig, NotAnMoEModelError, find_moe_layers
from esft_peft.demo import synthetic_tasks as st
from esft_peft.scoring import (
    AllTokensMaskedError,
    EmptyDataError,
    ExpertScores,
    IncompatibleScoresError,
    compare_tasks,
    plot_comparison,
    plot_scores,
    score_experts,
)

FUSED, SPLIT_GLU, DENSE_BMM, PARALLEL_LINEAR, MODULE_LIST = "fused", "split_glu", "dense_bmm", "parallel_linear", "module_list"
OFFICIAL = Path(__file__).parent / "data" / "esft_official"
TASKS = ("intent", "law", "summary", "translation")
MATRIX = ("qwen3_moe", "deepseek_v3", "gpt_oss", "llama4_text", "jetmoe", "dbrx", "modulelist")


def random_batches(count=3, rows=3, length=12, seed=0, pad=True, labels=True):
    """Right-padded batches with ragged lengths and the first tokens of each row labelled -100 (prompt)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(3, 96, (rows, length), generator=g)
        lengths = torch.randint(length // 2, length + 1, (rows,), generator=g) if pad else torch.full((rows,), length)
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
        batch = {"input_ids": ids, "attention_mask": mask}
        if labels:
            batch["labels"] = torch.where(torch.arange(length)[None] < 3, -100, ids).masked_fill(mask == 0, -100)
        batches.append(batch)
    return batches


def counted_mask(batch, mask_prompt=True):
    counted = batch["attention_mask"].bool()
    if mask_prompt and "labels" in batch:
        counted &= batch["labels"] != -100
    return counted.flatten()


class ExpertSpy:
    """Ground truth of what the experts receive, read at the experts' side (not at the hooks scoring uses)."""

    def __init__(self, model, layer):
        self.layer, self.handles, self.records = layer, [], []  # records: (assign[T, E] 0/1, gate[T, E] or None)
        experts = model.get_submodule(layer.experts_name)
        num = layer.num_experts
        if layer.kind in (FUSED, SPLIT_GLU):
            def hook(module, args):
                index, weights = args[1], args[2]
                assign = F.one_hot(index.reshape(len(index), -1), num).sum(1).double()
                gate = torch.zeros(len(index), num, dtype=torch.float64).scatter_add_(
                    1, index.reshape(len(index), -1), weights.reshape(len(index), -1).double())
                self.records.append((assign, gate))
            self.handles.append(experts.register_forward_pre_hook(hook))
        elif layer.kind == DENSE_BMM:  # experts get every token scaled by its routing score: recover the score
            block = model.get_submodule(layer.block_name)
            seen = {}
            self.handles.append(block.register_forward_pre_hook(
                lambda m, args: seen.update(x=args[0].reshape(-1, args[0].shape[-1]))))

            def hook(module, args):
                x = seen["x"]
                routed = args[0].view(num, len(x), -1)
                score = ((routed * x).sum(-1) / (x * x).sum(-1)).T.double()  # [T, E]
                self.records.append(((score.abs() > 1e-6).double(), score))
            self.handles.append(experts.register_forward_pre_hook(hook))
        elif layer.kind == PARALLEL_LINEAR:  # only the per-expert token counts reach input_linear
            def hook(module, args):
                self.records.append((torch.tensor(args[1], dtype=torch.float64)[None], None))
            self.handles.append(experts.input_linear.register_forward_pre_hook(hook))
        elif layer.kind == MODULE_LIST:  # rows each expert MLP is called with
            calls = []
            for expert_id, name in layer.expert_modules.items():
                module = model.get_submodule(name)
                self.handles.append(module.register_forward_pre_hook(
                    lambda m, args, e=expert_id: calls.append((e, len(args[0])))))
            block = model.get_submodule(layer.block_name)

            def flush(module, args, output):
                counts = torch.zeros(1, num, dtype=torch.float64)
                for e, n in calls:
                    counts[0, e] += n
                calls.clear()
                self.records.append((counts, None))
            self.handles.append(block.register_forward_hook(flush))

    def totals(self, masks=None):
        counts = torch.zeros(self.layer.num_experts, dtype=torch.float64)
        gates = torch.zeros_like(counts)
        for i, (assign, gate) in enumerate(self.records):
            weight = torch.ones(len(assign), 1, dtype=torch.float64) if masks is None else masks[i].double()[:, None]
            counts += (assign * weight).sum(0)
            if gate is not None:
                gates += (gate * weight).sum(0)
        return counts, gates

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("family", MATRIX)
def test_recorded_routing_matches_what_experts_receive(family):
    model = make_model(family)
    layers = find_moe_layers(model)
    kinds = {layer.kind for layer in layers.values()}
    batches = random_batches(pad=False, labels=False)
    spies = {key: ExpertSpy(model, layer) for key, layer in layers.items()}
    try:
        scores = score_experts(model, batches, token_budget=None, show_progress=False)
    finally:
        for spy in spies.values():
            spy.remove()
    tokens = sum(b["attention_mask"].sum().item() for b in batches)
    assert scores.layers == sorted(layers, key=int)
    for key, spy in spies.items():
        counts, gates = spy.totals()
        assert scores.token_counts[key] == tokens
        assert scores.expert_counts[key] == [int(c) for c in counts.tolist()]
        assert sum(scores.expert_counts[key]) == tokens * scores.top_k
        assert sum(scores.token_scores[key]) == pytest.approx(1.0)
        if spy.records[0][1] is not None:
            torch.testing.assert_close(torch.tensor(scores.gate_scores[key], dtype=torch.float64), gates / tokens,
                                       atol=1e-6, rtol=1e-5)
    assert len(kinds) == 1 and scores.top_k == {"llama4_text": 1}.get(family, 2)


@pytest.mark.parametrize("family", ("qwen3_moe", "llama4_text", "modulelist"))
def test_padding_and_prompt_tokens_are_not_counted(family):
    model = make_model(family)
    layers = find_moe_layers(model)
    batches = random_batches()
    key = next(iter(layers))
    for mask_prompt in (True, False):
        spy = ExpertSpy(model, layers[key])
        try:
            scores = score_experts(model, batches, token_budget=None, mask_prompt=mask_prompt, show_progress=False)
        finally:
            spy.remove()
        masks = [counted_mask(b, mask_prompt) for b in batches]
        tokens = int(sum(m.sum() for m in masks))
        assert scores.token_counts[key] == tokens
        assert sum(scores.expert_counts[key]) == tokens * scores.top_k
        if layers[key].kind != MODULE_LIST:  # module-list experts see padding too, so only the totals compare
            counts, gates = spy.totals(masks)
            assert scores.expert_counts[key] == [int(c) for c in counts.tolist()]
            torch.testing.assert_close(torch.tensor(scores.gate_scores[key], dtype=torch.float64), gates / tokens,
                                       atol=1e-6, rtol=1e-5)


def test_qwen3_scores_equal_a_direct_recomputation_of_the_router():
    model = make_model("qwen3_moe", norm_topk_prob=True)
    layers = find_moe_layers(model)
    batches = random_batches(count=2)
    inputs = {key: [] for key in layers}
    handles = [
        model.get_submodule(layer.block_name).register_forward_pre_hook(
            lambda m, args, key=key: inputs[key].append(args[0].reshape(-1, args[0].shape[-1])))
        for key, layer in layers.items()
    ]
    try:
        scores = score_experts(model, batches, token_budget=None, show_progress=False)
    finally:
        for handle in handles:
            handle.remove()
    masks = torch.cat([counted_mask(b) for b in batches]).double()
    for key, layer in layers.items():
        gate = model.get_submodule(layer.block_name).gate
        probs = F.softmax(F.linear(torch.cat(inputs[key]), gate.weight), dim=-1)
        top, index = probs.topk(2, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        counts = torch.zeros(8, dtype=torch.float64).index_add_(0, index.flatten(), masks.repeat_interleave(2))
        weighted = (top.double() * masks[:, None]).flatten()
        gates = torch.zeros(8, dtype=torch.float64).index_add_(0, index.flatten(), weighted)
        tokens = masks.sum()
        assert scores.expert_counts[key] == [int(c) for c in counts]
        torch.testing.assert_close(torch.tensor(scores.token_scores[key], dtype=torch.float64), counts / (2 * tokens))
        torch.testing.assert_close(torch.tensor(scores.gate_scores[key], dtype=torch.float64), gates / tokens)
    assert scores.renormalized is True and scores.weight_scale == 1.0


@pytest.mark.parametrize(
    ("family", "overrides", "renormalized", "scale"),
    [("qwen3_moe", {"norm_topk_prob": False}, False, None), ("qwen3_moe", {"norm_topk_prob": True}, True, 1.0),
     ("deepseek_v3", {}, True, 2.5), ("llama4_text", {}, False, None)],
)
def test_renormalisation_and_scaling_are_detected_from_the_weights(family, overrides, renormalized, scale):
    scores = score_experts(make_model(family, **overrides), random_batches(count=1), show_progress=False)
    assert scores.renormalized is renormalized and scores.weight_scale == scale
    assert all(s["min"] <= s["mean"] <= s["max"] for s in scores.weight_sums.values())
    assert sum(scores.gate_scores["1"]) == pytest.approx(scores.weight_sums["1"]["mean"])


def test_token_budget_counts_exactly_that_many_tokens():
    model = make_model("qwen3_moe")
    scores = score_experts(model, random_batches(count=4), token_budget=37, show_progress=False)
    assert set(scores.token_counts.values()) == {37}
    assert sum(scores.expert_counts["0"]) == 37 * 2
    assert scores.metadata["num_tokens"] == 37 and scores.metadata["token_budget"] == 37


def test_sequence_average_is_the_mean_of_per_sequence_scores():
    model = make_model("deepseek_v3")
    examples = [{"input_ids": list(range(3, 3 + n)), "labels": [-100] * 2 + list(range(5, 3 + n))} for n in (5, 9, 14)]
    pooled = score_experts(model, examples, token_budget=None, batch_size=1, show_progress=False)
    per_sequence = score_experts(model, examples, token_budget=None, batch_size=1, average="sequences",
                                 show_progress=False)
    singles = [score_experts(model, [e], token_budget=None, show_progress=False) for e in examples]
    assert per_sequence.average == "sequences" and per_sequence.num_sequences == 3
    for key in pooled.layers:
        for name in ("token", "gate"):
            expected = torch.tensor([s.scores(name)[key] for s in singles]).double().mean(0)
            torch.testing.assert_close(torch.tensor(per_sequence.scores(name)[key]).double(), expected)
        assert pooled.token_scores[key] != pytest.approx(per_sequence.token_scores[key])
        assert pooled.expert_counts == per_sequence.expert_counts


def test_texts_datasets_loaders_and_tokenized_examples_give_the_same_scores():
    from datasets import Dataset
    from torch.utils.data import DataLoader

    model = make_model("qwen3_moe")
    tokenizer = st.build_tokenizer()
    texts = st.make_texts("reverse", 10, seed=1)
    kwargs = dict(tokenizer=tokenizer, token_budget=None, batch_size=4, show_progress=False)
    reference = score_experts(model, texts, **kwargs)
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    assert reference.token_counts["0"] == sum(map(len, encoded))
    from_dataset = score_experts(model, Dataset.from_dict({"text": texts}), **kwargs)
    from_generator = score_experts(model, (t for t in texts), **kwargs)
    from_examples = score_experts(model, Dataset.from_dict({"input_ids": encoded}), **kwargs)
    loader = DataLoader([{"input_ids": torch.tensor(ids)} for ids in encoded], batch_size=1)
    from_loader = score_experts(model, loader, **kwargs)
    for other in (from_dataset, from_generator, from_examples, from_loader):
        assert other.expert_counts == reference.expert_counts
        assert other.metadata["data_fingerprint"] == reference.metadata["data_fingerprint"]
        for key in reference.layers:
            assert other.gate_scores[key] == pytest.approx(reference.gate_scores[key], abs=1e-6)
    other_texts = score_experts(model, st.make_texts("sort", 10, seed=1), **kwargs)
    assert other_texts.metadata["data_fingerprint"] != reference.metadata["data_fingerprint"]


def test_conversations_use_the_chat_template_and_count_only_answers():
    model = make_model("modulelist")
    tokenizer = st.build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}= {% endif %}{{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}= {% endif %}"
    )
    chats = [[{"role": "user", "content": "<copy> 1 2 3"}, {"role": "assistant", "content": "1 2 3 </s>"}]] * 3
    answers = score_experts(model, chats, tokenizer=tokenizer, token_budget=None, show_progress=False)
    everything = score_experts(model, chats, tokenizer=tokenizer, mask_prompt=False, token_budget=None,
                               show_progress=False)
    assert answers.token_counts["0"] == 3 * 4  # "1 2 3 </s>"
    assert everything.token_counts["0"] == 3 * 9  # "<copy> 1 2 3 = 1 2 3 </s>"
    tokenizer.chat_template = None  # fallback: "role: content" lines, still only the answers counted
    plain = score_experts(model, chats, tokenizer=tokenizer, token_budget=None, show_progress=False)
    answer = tokenizer("assistant: 1 2 3 </s>\n", add_special_tokens=False)["input_ids"]
    assert plain.token_counts["0"] == 3 * len(answer)


def test_long_sequences_are_truncated_with_a_warning():
    model = make_model("qwen3_moe")
    examples = [{"input_ids": list(range(3, 40))}, {"input_ids": list(range(3, 10))}]
    with pytest.warns(UserWarning, match="1 sequence.*truncated"):
        scores = score_experts(model, examples, max_length=16, token_budget=None, show_progress=False)
    assert scores.token_counts["0"] == 16 + 7 and scores.metadata["truncated_sequences"] == 1


def test_progress_bar_counts_tokens(capsys):
    score_experts(make_model("qwen3_moe"), random_batches(count=1, pad=False, labels=False), token_budget=100)
    err = capsys.readouterr().err
    # the data ended before the budget: the bar ends at 100% of what there was, not at 36%
    assert "scoring experts" in err and "0/100" in err and "36/36" in err and "100%" in err and "tok" in err


def _hook_counts(model):
    return {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()}


@pytest.mark.parametrize("family", ("qwen3_moe", "llama4_text", "modulelist"))
def test_model_is_left_as_found_even_after_an_error(family):
    model = make_model(family).train()
    frozen = model.get_submodule(find_moe_layers(model)[next(iter(find_moe_layers(model)))].block_name)
    frozen.eval()
    fired = []
    model.get_submodule("lm_head").register_forward_hook(lambda *a: fired.append(1))
    implementation = getattr(model.config, "_experts_implementation", None)
    before = _hook_counts(model)
    modes = {name: m.training for name, m in model.named_modules()}

    def failing():
        yield from random_batches(count=1)
        raise RuntimeError("data source broke")

    with pytest.raises(RuntimeError, match="data source broke"):
        score_experts(model, failing(), show_progress=False)
    score_experts(model, random_batches(count=1), show_progress=False)
    assert _hook_counts(model) == before
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert getattr(model.config, "_experts_implementation", None) == implementation
    assert len(fired) == 2  # the user's hook stayed in place and ran in both scoring passes


def test_peft_wrapped_model_scores_like_its_base():
    from peft import get_peft_model

    base_scores = score_experts(make_model("qwen3_moe"), random_batches(), show_progress=False)
    wrapped = get_peft_model(make_model("qwen3_moe"), ESFTConfig(experts={"0": [1, 2], "1": [0]}))
    wrapped_scores = score_experts(wrapped, random_batches(), show_progress=False)
    assert wrapped_scores.expert_counts == base_scores.expert_counts
    assert wrapped_scores.gate_scores.keys() == base_scores.gate_scores.keys()
    for key, expected in base_scores.gate_scores.items():
        assert wrapped_scores.gate_scores[key] == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------ selection


@pytest.mark.parametrize("task", TASKS)
def test_token_scores_at_p02_reproduce_the_official_expert_configs(task):
    scores = ExpertScores.load(OFFICIAL / f"expert_scores_{task}.json")
    official = ESFTConfig.from_expert_config(json.loads((OFFICIAL / f"expert_config_{task}.json").read_text()))
    selected = scores.select(score_function="token", top_p=0.2)
    assert selected == official.experts  # ids and their order
    assert ESFTConfig(experts=selected).experts == official.experts
    assert scores.to_config("token", 0.2).experts == official.experts
    assert sum(map(len, selected.values())) == {"intent": 124, "law": 153, "summary": 128, "translation": 83}[task]


def _toy_scores():
    token = {"1": [0.5, 0.3, 0.15, 0.05], "2": [0.1, 0.1, 0.7, 0.1], "10": [0.25, 0.25, 0.25, 0.25]}
    gate = {k: [v * 0.4 for v in vs] for k, vs in token.items()}
    return ExpertScores(token_scores=token, gate_scores=gate)


def test_selection_rules():
    scores = _toy_scores()
    assert scores.select() == {"1": [0], "2": [2], "10": [0]}
    assert scores.select("token", 0.6) == {"1": [0, 1], "2": [2], "10": [0, 1, 2]}
    assert scores.select("token", 1.0) == {"1": [0, 1, 2, 3], "2": [2, 0, 1, 3], "10": [0, 1, 2, 3]}
    assert scores.select("gate", 0.1) == {"1": [0], "2": [2], "10": [0]}
    assert scores.select("gate", 0.25) == {"1": [0, 1], "2": [2], "10": [0, 1, 2]}
    assert list(scores.select()) == ["1", "2", "10"]
    assert scores.select(top_k=2) == {"1": [0, 1], "2": [2, 0], "10": [0, 1]}
    assert scores.select(budget=5) == {"1": [0, 1], "2": [2], "10": [0, 1]}
    assert scores.select(budget=3) == {"1": [0], "2": [2], "10": [0]}


def test_random_selection_keeps_per_layer_counts_and_is_seeded():
    scores = ExpertScores.load(OFFICIAL / "expert_scores_law.json")
    best = scores.select("token", 0.2)
    first = scores.select("token", 0.2, randomize=True, seed=3)
    assert first == scores.select("token", 0.2, randomize=True, seed=3)
    assert first != scores.select("token", 0.2, randomize=True, seed=4)
    assert {k: len(v) for k, v in first.items()} == {k: len(v) for k, v in best.items()}
    assert first != best
    for layer, ids in first.items():  # descending relevance
        values = [scores.token_scores[layer][e] for e in ids]
        assert values == sorted(values, reverse=True) and len(set(ids)) == len(ids)


@pytest.mark.parametrize("top_p", [0, -0.1, 1.5, float("nan"), True])
def test_top_p_outside_unit_interval_is_refused(top_p):
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        _toy_scores().select("token", top_p)


def test_selection_argument_errors():
    scores = _toy_scores()
    with pytest.raises(ValueError, match="Unknown score function 'expert'"):
        scores.select("expert")
    with pytest.raises(ValueError, match="one selection rule"):
        scores.select(top_p=0.2, top_k=2)
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 4\]"):
        scores.select(top_k=5)
    with pytest.raises(ValueError, match=r"budget must be an integer in \[3, 12\]"):
        scores.select(budget=2)


def test_scores_from_another_model_are_refused():
    model = make_model("qwen3_moe")
    foreign = score_experts(make_model("deepseek_v3"), random_batches(count=1), show_progress=False)
    with pytest.raises(IncompatibleScoresError, match=r"layers \['2'\] are scored.*layers \['0'\] of the model"):
        foreign.select(model=model)
    with pytest.raises(IncompatibleScoresError):
        foreign.to_config(model=model)
    official = ExpertScores.load(OFFICIAL / "expert_scores_intent.json")
    with pytest.raises(IncompatibleScoresError, match="scores for 64 experts, model has 8"):
        official.check_compatible({k: v for k, v in find_moe_layers(make_model("deepseek_v2")).items()})
    own = score_experts(model, random_batches(count=1), show_progress=False)
    own.check_compatible(model)
    assert own.select(model=model) == own.select()


# ------------------------------------------------------------------------------------------------ files


def test_save_and_load_round_trip_both_formats(tmp_path):
    scores = score_experts(make_model("deepseek_v3"), random_batches(count=1), show_progress=False)
    scores.save(tmp_path / "scores.json")
    again = ExpertScores.load(tmp_path / "scores.json")
    path = str(tmp_path / "scores.json")
    assert again.to_dict() == {**scores.to_dict(), "metadata": {**scores.metadata, "path": path}}
    meta = again.metadata
    assert meta["model_type"] == "deepseek_v3" and len(meta["config_fingerprint"]) == 16 and meta["seed"] == 0
    assert set(meta["versions"]) == {"esft-peft", "torch", "transformers", "peft"}
    scores.save(tmp_path / "official.json", format="official")
    raw = json.loads((tmp_path / "official.json").read_text())
    assert set(raw) == {"token_scores", "gate_scores"} and set(raw["token_scores"]["1"]) == {str(e) for e in range(8)}
    official = ExpertScores.load(tmp_path / "official.json")
    assert official.token_scores == scores.token_scores and official.gate_scores == scores.gate_scores
    assert official.select() == scores.select()
    assert not list(tmp_path.glob(".*.tmp"))


def test_bad_score_files_are_refused(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ExpertScores.load(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"experts": {"1": [0]}}))
    with pytest.raises(ValueError, match="Not an expert scores file"):
        ExpertScores.load(tmp_path / "b.json")
    (tmp_path / "c.json").write_text(json.dumps({"token_scores": {"1": {"0": 1.0, "2": 0.0}}, "gate_scores": {}}))
    with pytest.raises(ValueError, match="every expert id"):
        ExpertScores.load(tmp_path / "c.json")


# ------------------------------------------------------------------------------------------------ errors


def test_empty_data_is_refused():
    from datasets import Dataset

    model = make_model("qwen3_moe")
    for empty in ([], Dataset.from_dict({"text": []}), iter([])):
        with pytest.raises(EmptyDataError, match="no sequence"):
            score_experts(model, empty, tokenizer=st.build_tokenizer(), show_progress=False)


def test_all_masked_tokens_are_refused():
    batch = {"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.full((2, 5), -100)}
    with pytest.raises(AllTokensMaskedError, match="mask_prompt=False"):
        score_experts(make_model("qwen3_moe"), [batch], show_progress=False)


def test_model_without_moe_layers_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(NotAnMoEModelError, match="no mixture-of-experts layer"):
        score_experts(dense, random_batches(count=1), show_progress=False)


def test_texts_without_tokenizer_and_bad_arguments_are_refused():
    model = make_model("qwen3_moe")
    with pytest.raises(ValueError, match="needs tokenizer"):
        score_experts(model, ["a b"], show_progress=False)
    with pytest.raises(ValueError, match="average must be one of"):
        score_experts(model, ["a b"], average="batches", show_progress=False)
    with pytest.raises(ValueError, match="token_budget must be"):
        score_experts(model, ["a b"], token_budget=0, show_progress=False)


# ------------------------------------------------------------------------------------------------ pictures


def test_heatmap_marks_the_selected_experts(tmp_path):
    scores = ExpertScores.load(OFFICIAL / "expert_scores_intent.json")
    figure = plot_scores(scores, path=tmp_path / "heat.png", score_function="token", selection=scores.select("token"))
    assert (tmp_path / "heat.png").stat().st_size > 1000
    axes = figure.axes[0]
    marked = axes.collections[0].get_offsets()
    assert len(marked) == 124
    assert {(int(x), int(y)) for x, y in marked} == {
        (e, row) for row, layer in enumerate(scores.layers) for e in scores.select("token", 0.2)[layer]
    }
    assert [t.get_text() for t in axes.get_yticklabels()] == scores.layers
    assert "124 experts selected" in axes.get_title()


def test_compare_tasks_numbers_and_figure(tmp_path):
    intent = ExpertScores.load(OFFICIAL / "expert_scores_intent.json")
    law = ExpertScores.load(OFFICIAL / "expert_scores_law.json")
    result = compare_tasks(intent, law, labels=("intent", "law"))
    figure = plot_comparison(result, tmp_path / "cmp.png")
    assert (tmp_path / "cmp.png").is_file() and len(figure.axes) == 2
    a, b = intent.select("token", 0.2), law.select("token", 0.2)
    assert result.overlap["1"] == {"a": len(a["1"]), "b": len(b["1"]), "shared": len(set(a["1"]) & set(b["1"])),
                                   "jaccard": len(set(a["1"]) & set(b["1"])) / len(set(a["1"]) | set(b["1"]))}
    assert result.concentration["law"]["5"]["experts"] == len(b["5"])
    assert 0 < result.concentration["intent"]["1"]["entropy"] < 1
    assert 0 <= result.mean_jaccard < 0.5
    same = compare_tasks(intent, intent, labels=("x", "y"))
    assert same.mean_jaccard == 1.0
    with pytest.raises(IncompatibleScoresError):
        compare_tasks(intent, _toy_scores())


def test_plotting_without_matplotlib_says_how_to_install(monkeypatch):
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    scores = _toy_scores()
    with pytest.raises(ImportError, match=r"pip install 'esft-peft\[plot\]'"):
        plot_scores(scores)
    comparison = compare_tasks(scores, scores, labels=("x", "y"))
    assert comparison.mean_jaccard == 1.0
    with pytest.raises(ImportError, match="matplotlib"):
        plot_comparison(comparison)


# ------------------------------------------------------------------------------------------------ core v2 defects


def test_encoder_and_decoder_layer_keys_select_and_sort_together():
    token = {"1": [0.6, 0.4], "encoder.1": [0.3, 0.7], "0": [0.9, 0.1], "encoder.0": [0.5, 0.5]}
    scores = ExpertScores(token_scores=token, gate_scores=token)
    assert scores.layers == ["encoder.0", "encoder.1", "0", "1"]
    assert scores.select("token", 0.5) == {"encoder.0": [0], "encoder.1": [1], "0": [0], "1": [0]}
    assert list(scores.select("token", top_k=1)) == scores.layers
    assert scores.select("token", budget=5)["encoder.0"] == [0, 1]
    assert list(ESFTConfig(experts=scores.select("token", 0.5)).experts) == scores.layers


def test_layer_lookups_accept_ints():
    scores = ExpertScores.load(OFFICIAL / "expert_scores_intent.json")
    assert scores.token_scores[1] == scores.token_scores["1"]
    assert 1 in scores.token_scores and 99 not in scores.token_scores
    assert scores.gate_scores.get(26) == scores.gate_scores["26"]
    with pytest.raises(KeyError):
        scores.token_scores[0]  # layer 0 of DeepSeek-V2-Lite is dense: not scored


def test_paper_top_p_is_one_default_for_the_api_and_the_cli(tmp_path):
    from esft_peft.cli.main import main
    from esft_peft.defaults import PAPER_TOP_P

    scores = ExpertScores.load(OFFICIAL / "expert_scores_law.json")
    scores.save(tmp_path / "scores.json")
    for function, p in PAPER_TOP_P.items():
        assert main(["select", "--scores", str(tmp_path / "scores.json"), "--score-function", function,
                     "--out", str(tmp_path / f"{function}.json")]) == 0
        written = json.loads((tmp_path / f"{function}.json").read_text())["experts"]
        assert written == scores.select(function) == scores.select(function, p)
    assert scores.select("gate") != scores.select("gate", 0.2)


def test_encoder_decoder_moe_is_refused_clearly():
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = AutoConfig.for_model("switch_transformers", vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                  num_decoder_layers=2, num_heads=4, num_experts=4, encoder_sparse_step=1,
                                  decoder_sparse_step=1, expert_capacity=8)
    model = AutoModelForSeq2SeqLM.from_config(config)
    assert list(find_moe_layers(model)) == ["encoder.0", "encoder.1", "0", "1"]
    with pytest.raises(ValueError, match="encoder-decoder.*ESFTConfig"):
        score_experts(model, [{"input_ids": torch.arange(8)}], show_progress=False)

"""Mixed-adapter batches in one experts call (``tuners/esft/mixed_experts.py``): each sample's pairs go to its own
adapter's experts, exactly as that sample run alone, forward and backward; and the benchmark that measures it."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from esft_peft import ESFTConfig, find_moe_layers
from esft_peft.tuners.esft.layer import ExpertsDeltaLayer
from esft_peft.tuners.esft.mixed_experts import grouped_experts
from esft_helpers import assert_generates_as_alone
from tiny_families import make_model

ROOT = Path(__file__).resolve().parents[1]
# "__base__" samples, adapters that share an expert (1 in the last layer), an adapter absent from a layer ("b")
NAMES = ["a", "__base__", "b", "a", "c", "b", "__base__", "c"]


def _three_adapters(family: str, **extra_c):
    model = make_model(family)
    first, last = list(find_moe_layers(model))[:1] + list(find_moe_layers(model))[-1:]
    experts = {"a": {first: [0, 2, 5], last: [1, 3]}, "b": {last: [0, 1, 2, 7]}, "c": {first: [2, 3], last: [1]}}
    peft_model = None
    for index, (name, chosen) in enumerate(experts.items()):
        torch.manual_seed(10 + index)
        config = ESFTConfig(experts=chosen, init_weights=False, **(extra_c if name == "c" else {}))
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    return peft_model.eval()


def _inputs(batch: int = len(NAMES), length: int = 5) -> torch.Tensor:
    return torch.randint(3, 90, (batch, length), generator=torch.Generator().manual_seed(5))


def _alone(model, input_ids: torch.Tensor, name: str, **kwargs):
    if name == "__base__":
        with model.disable_adapter():
            return model(input_ids=input_ids, **kwargs).logits
    model.set_adapter(name)
    return model(input_ids=input_ids, **kwargs).logits


class ExpertCalls:
    """Counts the calls of the frozen experts modules (the implementation's work, whatever the route)."""

    def __init__(self, model) -> None:
        self.count = 0
        self.handles = [
            module.get_base_layer().register_forward_pre_hook(lambda *_: setattr(self, "count", self.count + 1))
            for module in model.modules()
            if isinstance(module, ExpertsDeltaLayer)
        ]

    def __enter__(self) -> "ExpertCalls":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2", "gpt_oss"])  # gpt_oss: biased experts
def test_one_call_matches_each_sample_alone_and_the_per_group_design(family):
    model = _three_adapters(family)
    input_ids = _inputs()
    layers = len(find_moe_layers(model))
    with torch.no_grad():
        with ExpertCalls(model) as calls:
            grouped = model(input_ids=input_ids, adapter_names=NAMES).logits
        assert calls.count <= 2 * layers  # one call for the virtual experts, one for the frozen pairs, per layer
        with grouped_experts(False), ExpertCalls(model) as calls:
            per_group = model(input_ids=input_ids, adapter_names=NAMES).logits
        assert calls.count > 2 * layers
        alone = torch.cat([_alone(model, input_ids[i : i + 1], name) for i, name in enumerate(NAMES)])
        batched = {name: _alone(model, input_ids, name) for name in set(NAMES)}
    for i, name in enumerate(NAMES):
        torch.testing.assert_close(grouped[i], alone[i], rtol=0, atol=1e-6)
        torch.testing.assert_close(grouped[i], per_group[i], rtol=0, atol=1e-6)
        torch.testing.assert_close(grouped[i], batched[name][i], rtol=0, atol=1e-6)
    for name in ("b", "c", "__base__"):  # the adapters differ on these samples, so the checks above can fail
        assert not torch.allclose(batched["a"], batched[name], atol=1e-4)
    assert not any("forward" in vars(module) for module in model.modules())  # nothing stays patched


def test_backward_matches_the_samples_run_alone():
    model = _three_adapters("deepseek_v2")
    deltas = {n: p for n, p in model.named_parameters() if ".esft_delta." in n}
    input_ids = _inputs()
    weights = torch.randn(len(NAMES), input_ids.shape[1], model.config.vocab_size,
                          generator=torch.Generator().manual_seed(3))

    def gradients(run) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        for param in deltas.values():
            param.requires_grad_(True)
        run()
        model.set_adapter("a")
        return {n: p.grad.clone() if p.grad is not None else None for n, p in deltas.items()}

    def mixed() -> None:
        (model(input_ids=input_ids, adapter_names=NAMES).logits * weights).sum().backward()

    def alone() -> None:
        for i, name in enumerate(NAMES):
            if name != "__base__":  # no adapter: nothing to differentiate
                logits = _alone(model, input_ids[i : i + 1], name)
                for param in deltas.values():  # set_adapter trains only the active adapter
                    param.requires_grad_(True)
                (logits * weights[i]).sum().backward()

    grouped = gradients(mixed)
    with grouped_experts(False):
        per_group = gradients(mixed)
    reference = gradients(alone)
    for name, grad in reference.items():
        adapter = name.split(".esft_delta.")[1].split(".")[0]
        if grad is None:  # a layer no sample of this adapter reaches with grad: zeros in a mixed batch
            assert adapter not in NAMES or not grouped[name].any()
            continue
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grouped[name], grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grouped[name], per_group[name], rtol=1e-5, atol=1e-6)


def test_generate_with_one_call_matches_single_adapter_generation():
    model = _three_adapters("deepseek_v2")
    input_ids = _inputs(batch=4, length=4)
    names = ["c", "__base__", "a", "b"]
    with torch.no_grad():
        mixed = model.generate(input_ids=input_ids, adapter_names=names, max_new_tokens=5, do_sample=False)
        with grouped_experts(False):
            assert torch.equal(
                model.generate(input_ids=input_ids, adapter_names=names, max_new_tokens=5, do_sample=False), mixed
            )
        assert_generates_as_alone(model, input_ids, names, mixed)


def test_blocks_with_a_trained_router_are_split_per_group_and_stay_exact():
    model = _three_adapters("qwen3_moe", train_router=True)  # "c" trains the routers of its layers
    input_ids = _inputs()
    with torch.no_grad(), ExpertCalls(model) as calls:
        mixed = model(input_ids=input_ids, adapter_names=NAMES).logits
        assert calls.count > 2 * len(find_moe_layers(model))
        for i, name in enumerate(NAMES):
            torch.testing.assert_close(mixed[i], _alone(model, input_ids[i : i + 1], name)[0], rtol=0, atol=1e-6)


def test_wrong_batch_is_refused_with_peft_wording():
    model = _three_adapters("deepseek_v2")
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs"):
        model(input_ids=_inputs(), adapter_names=NAMES[:3])
    assert not any("forward" in vars(module) for module in model.modules())


def test_grouped_experts_restores_the_setting():
    from esft_peft.tuners.esft import mixed_experts

    with grouped_experts(False):
        assert not mixed_experts._enabled[0]
        with grouped_experts(True):
            assert mixed_experts._enabled[0]
        assert not mixed_experts._enabled[0]
    assert mixed_experts._enabled[0]


def test_benchmark_reports_every_case(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("mixed_adapters_bench", ROOT / "benchmarks" / "mixed_adapters.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "mixed.json"
    threads = torch.get_num_threads()
    try:  # one thread: fast on a busy machine; restored for the tests that follow
        bench.main(["--model", "deepseek_v2", "--hidden", "32", "--moe-inner", "16", "--layers", "2",
                    "--mode", "generate", "decode", "forward", "--adapters", "1", "2", "--batch", "2", "--prompt", "3",
                    "--new-tokens", "2", "--rounds", "1", "--threads", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    runs = json.loads(out.read_text())["runs"]
    assert [run["mode"] for run in runs] == ["generate", "decode", "forward"]
    for run in runs:
        assert set(run["cases"]) == {"merged", "one adapter", "1 mixed (per-group)", "1 mixed (grouped)",
                                     "2 mixed (per-group)", "2 mixed (grouped)"}
        assert run["cases"]["one adapter"]["x_one_adapter"] == 1.0
        # decode is a difference of two timings: its sign is noise at these sizes, one round
        assert all(math.isfinite(case["ms_per_token"]) for case in run["cases"].values())
        if run["mode"] != "decode":
            assert all(case["ms_per_token"] > 0 for case in run["cases"].values())


def test_beam_search_with_one_call_matches_single_adapter_beam_search():
    model = _three_adapters("qwen3_moe")
    input_ids = _inputs(batch=3, length=4)
    names = ["b", "__base__", "c"]
    settings = dict(max_new_tokens=4, num_beams=2, do_sample=False)
    with torch.no_grad():
        mixed = model.generate(input_ids=input_ids, adapter_names=names, **settings)
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model.generate(input_ids=input_ids[i : i + 1], **settings)
            else:
                model.set_adapter(name)
                alone = model.generate(input_ids=input_ids[i : i + 1], **settings)
            assert torch.equal(mixed[i], alone[0])


def test_only_the_virtual_experts_that_receive_pairs_are_formed():
    model = _three_adapters("deepseek_v2")
    input_ids = _inputs()
    routed, called = {}, {}
    handles = []
    for module in model.modules():
        if isinstance(module, ExpertsDeltaLayer):
            experts = module.get_base_layer()
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, key=module: routed.__setitem__(key, args[1].reshape(len(NAMES), -1))))
            handles.append(experts.register_forward_pre_hook(
                lambda mod, args, key=module: called.setdefault(key, []).append(mod.num_experts)))
    with torch.no_grad():
        model(input_ids=input_ids, adapter_names=NAMES)
    for handle in handles:
        handle.remove()
    assert routed
    for layer, index in routed.items():
        receiving = {(name, int(e)) for name, row in zip(NAMES, index) for e in row.tolist()
                     if e in layer.esft_expert_ids.get(name, [])}
        assert receiving  # this layer's selected call is exercised
        total = layer.layout.num_experts(layer.get_base_layer())
        # one call over the virtual experts that receive pairs, one over the frozen experts
        assert called[layer] == [len(receiving), total]

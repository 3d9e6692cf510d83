"""The package's structure: imports run one way, one registry of experts layouts, guarded private APIs."""

from __future__ import annotations

import ast
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
from peft import get_peft_model

from esft_peft import ESFTConfig, PESCConfig, find_moe_layers
from esft_peft.moe.errors import UnsupportedLayoutError
from esft_peft.moe.layouts import LAYOUTS
from tiny_dense import make_dense_model
from tiny_families import FAMILIES, make_model

PACKAGE = Path(__file__).parents[1] / "src" / "esft_peft"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> esft_peft modules it imports, at module level or inside functions (deferred imports count)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
                targets = targets or ([base] if base in modules else [])
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names if alias.name in modules]
            else:
                continue
            graph[name].update(target for target in targets if target != name)
    return graph


def test_no_import_cycles_including_deferred_imports():
    graph = import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles
    assert len(graph) > 30  # the walk saw the whole package


def test_imports_run_one_way_across_layers():
    """cli/demo -> scoring/interop/training -> tuners -> moe; leaf modules (files, defaults, ...) sit below all."""
    rank = {"cli": 0, "demo": 0.5, "scoring": 1, "interop": 1, "training": 1, "tuners": 2, "moe": 3}
    layer_of = lambda module: module.split(".")[1] if module.count(".") >= 2 else None  # noqa: E731
    wrong = [
        (source, target)
        for source, targets in import_graph().items()
        for target in targets
        if layer_of(source) in rank and layer_of(target) in rank and layer_of(source) != layer_of(target)
        and rank[layer_of(target)] <= rank[layer_of(source)]
    ]
    assert not wrong, wrong


def test_plotting_depends_on_scores_never_the_reverse():
    graph = import_graph()
    importers = {name for name, targets in graph.items() if "esft_peft.scoring.plotting" in targets}
    assert importers <= {"esft_peft", "esft_peft.scoring", "esft_peft.cli.main", "esft_peft.demo.run"}, importers


def test_the_delta_marker_is_written_once():
    places = []
    for path in PACKAGE.rglob("*.py"):
        with open(path, "rb") as source:
            strings = [t.string for t in tokenize.tokenize(source.readline) if t.type == tokenize.STRING]
        places += [f"{path.name}: {text}" for text in strings if ".esft_delta." in text or text == '"esft_delta"']
    assert places == ['layer.py: "esft_delta"'], places


def test_one_layout_class_per_kind_and_every_family_detected():
    kinds = [layout.kind for layout in LAYOUTS]
    assert len(set(kinds)) == len(kinds) == 6
    found = {family: {layer.kind for layer in find_moe_layers(make_model(family)).values()} for family in FAMILIES}
    crafted = get_peft_model(make_dense_model("llama"), PESCConfig(num_experts=4, top_k=2, adapter_dim=8))
    found["pesc"] = {layer.kind for layer in find_moe_layers(crafted).values()}
    assert set().union(*found.values()) == set(kinds), found
    assert all(len(layouts) == 1 for layouts in found.values()), found


def test_a_layout_says_how_experts_are_stored_and_its_users_key_on_its_kind():
    """"Layout" names one thing: storage. ESFT's compute, scoring's routing capture and the official export mapping
    live with their users, one entry per layout kind that they serve."""
    from esft_peft.interop.official_mapping import MAPPINGS
    from esft_peft.moe.layouts.base import ExpertsLayout
    from esft_peft.scoring.routing_capture import CAPTURES
    from esft_peft.tuners.esft.compute import COMPUTES

    kinds = {layout.kind for layout in LAYOUTS}
    assert set(CAPTURES) == kinds
    assert set(COMPUTES) == kinds - {"module_list", "pesc"}  # ModuleList experts: module deltas; PESC: not ESFT's
    assert set(MAPPINGS) <= kinds and {"fused", "module_list"} <= set(MAPPINGS)
    uses = {"forward", "compute", "watch_routing", "official_projections"}
    assert not uses & ({name for layout in LAYOUTS for name in vars(type(layout))} | set(vars(ExpertsLayout)))
    assert all(compute.layout.kind == kind for kind, compute in COMPUTES.items())


def test_no_private_transformers_api_is_used():
    """ESFT computes fused experts through the experts module itself (transformers' experts interface). (PESC's own
    adapter experts, outside this check, use transformers' grouped matmul.)"""
    private = []
    for path in PACKAGE.rglob("*.py"):
        if "pesc" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers"):
                private += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not private, private


def test_experts_whose_num_experts_disagrees_with_their_weights_are_refused():
    model = make_model("qwen3_moe")
    model.model.layers[0].mlp.experts.num_experts = 3
    with pytest.raises(UnsupportedLayoutError, match="num_experts is 3, not the 8 experts"):
        get_peft_model(model, ESFTConfig(experts={0: [1]}))


def test_import_works_without_the_private_api():
    code = ("import transformers.integrations.moe as moe; del moe._grouped_linear; "
            "import esft_peft; print(esft_peft.ESFTConfig(experts={1: [0]}).peft_type.value)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ESFT"


def test_expert_parallel_experts_are_refused():
    model = make_model("qwen3_moe")
    model.model.layers[0].mlp.experts._is_expert_parallel = True
    with pytest.raises(UnsupportedLayoutError, match="expert parallelism"):
        get_peft_model(model, ESFTConfig(experts={0: [1]}))

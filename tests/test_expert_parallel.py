"""ESFT under transformers' native expert parallelism equals one process.

One ``torchrun --nproc-per-node 2`` launch (gloo, CPU) of ``tests/ep_worker.py`` trains every family on models loaded
with ``DistributedConfig(ep_size=2, fsdp_size=2)`` (each rank its half of the global batch), saves, reloads onto a
fresh EP base, merges, scores, checks the errors, trains two active adapters together, and trains PESC on a dense
model loaded with ``DistributedConfig(fsdp_size=2)``; a second launch runs one family on 4 processes, a third trains
two families with ``transformers.Trainer``. Each result is compared here with the same code run in one process on the
whole batch. Tolerance (float32): 1e-5 on losses, adapter values and logits.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import ep_worker
from esft_peft.scoring import ExpertScores, score_experts
from tiny_dense import make_dense_model
from tiny_families import make_model

ROOT = Path(__file__).parent.parent
ATOL = 1e-5
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def torchrun(processes: int, args: list, timeout: int = 600) -> None:
    with socket.socket() as probe:  # a free port, so that parallel test workers do not collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
               "--master-port", str(port), "tests/ep_worker.py", *map(str, args)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ep_models")
    for family in ep_worker.FAMILIES:
        make_model(family).save_pretrained(root / family)
    make_model("qwen3_moe", num_experts=3).save_pretrained(root / "three_experts")
    make_dense_model("llama").save_pretrained(root / "llama")
    return root


@pytest.fixture(scope="module")
def two_ranks(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ep2")
    torchrun(2, ["--models", models, "--out", out, "--families", *ep_worker.FAMILIES, "--score", "--errors",
                 "--pesc", "llama", "--fsdp", "qwen3_moe", "--several", *ep_worker.SEVERAL_FAMILIES])
    return out


def one_process(models: Path, family: str, out: Path, grad_norms: Optional[list] = None):
    """The reference: the same config and loop in one process on the whole batch."""
    base = AutoModelForCausalLM.from_pretrained(models / family, dtype=torch.float32)
    model = get_peft_model(base, ep_worker.esft_config(family, base)).train()
    losses = ep_worker.train(model, grad_norms=grad_norms)
    model.save_pretrained(out)
    return model, losses


def assert_same_adapter(expected_dir: Path, got_dir: Path) -> None:
    expected = load_file(expected_dir / "adapter_model.safetensors")
    got = load_file(got_dir / "adapter_model.safetensors")
    assert got.keys() == expected.keys() and expected
    for key, value in expected.items():
        assert got[key].shape == value.shape, key
        torch.testing.assert_close(got[key], value, atol=ATOL, rtol=0, msg=key)
    assert json.loads((got_dir / "adapter_config.json").read_text()) == json.loads(
        (expected_dir / "adapter_config.json").read_text()
    )


@pytest.mark.parametrize("family", ep_worker.FAMILIES)
def test_ep_training_saving_loading_and_merging_equal_one_process(two_ranks, models, tmp_path, family):
    grad_norms = []
    single, losses = one_process(models, family, tmp_path / "single", grad_norms)
    assert json.loads((two_ranks / family / "losses.json").read_text()) == pytest.approx(losses, abs=ATOL)
    # torch's clip_grad_norm_ over the trainable (DTensor) deltas computes one process's global norm
    assert json.loads((two_ranks / family / "grad_norms.json").read_text()) == pytest.approx(grad_norms, rel=ATOL)
    assert_same_adapter(tmp_path / "single", two_ranks / family)
    expected = ep_worker.logits(single)
    ep = torch.load(two_ranks / family / "ep_logits.pt")
    for name in ("trained", "reloaded", "merged"):
        torch.testing.assert_close(ep[name], expected, atol=ATOL, rtol=0, msg=name)
    # the adapter saved under EP loads into an unsharded base
    base = AutoModelForCausalLM.from_pretrained(models / family, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, two_ranks / family)
    torch.testing.assert_close(ep_worker.logits(loaded), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ep_worker.SEVERAL_FAMILIES)
def test_several_active_adapters_train_together_under_ep_as_in_one_process(two_ranks, models, tmp_path, family):
    """Two active adapters (overlapping experts, shared experts or router in both; the forward sums their deltas)
    trained together: each rank's gradients of each adapter's deltas are synchronised on their own."""
    base = AutoModelForCausalLM.from_pretrained(models / family, dtype=torch.float32)
    single = ep_worker.several_adapters(family, base)
    assert {n.split(".")[-2] for n, p in single.named_parameters() if p.requires_grad} >= {"default", "other"}
    grad_norms = []
    losses = ep_worker.train(single, lr=ep_worker.SEVERAL_LR, grad_norms=grad_norms)
    single.save_pretrained(tmp_path / "single")
    got = two_ranks / "several" / family
    assert json.loads((got / "losses.json").read_text()) == pytest.approx(losses, abs=ATOL)
    assert json.loads((got / "grad_norms.json").read_text()) == pytest.approx(grad_norms, rel=ATOL)
    assert_same_adapter(tmp_path / "single", got)
    assert_same_adapter(tmp_path / "single" / "other", got / "other")
    expected, ep = ep_worker.logits(single), torch.load(got / "ep_logits.pt")
    for name in ("trained", "reloaded"):
        torch.testing.assert_close(ep[name], expected, atol=ATOL, rtol=0, msg=name)


def test_ep_scores_equal_one_process(two_ranks, models):
    base = AutoModelForCausalLM.from_pretrained(models / ep_worker.FAMILIES[0], dtype=torch.float32)
    expected = score_experts(base, ep_worker.scoring_data(), **ep_worker.SCORING)
    got = ExpertScores.load(two_ranks / "scores.json")
    assert got.expert_counts == expected.expert_counts and got.token_counts == expected.token_counts
    assert got.num_sequences == expected.num_sequences
    assert got.metadata["data_fingerprint"] == expected.metadata["data_fingerprint"]
    for key in expected.layers:
        assert got.token_scores[key] == expected.token_scores[key]
        assert got.gate_scores[key] == pytest.approx(expected.gate_scores[key], rel=1e-6, abs=1e-9)


def test_ep_errors_are_clear_and_leave_the_model_unwrapped(two_ranks):
    errors = json.loads((two_ranks / "errors.json").read_text())
    assert "expert ids [8] are out of range; valid ids are 0..7" in errors["out_of_range"]
    assert errors["out_of_range_wrapped"] == 0
    assert "evenly shard 3 experts across 2" in errors["indivisible"]
    assert "inside each expert" in errors["tensor_parallel_experts"]
    assert errors["tensor_parallel_experts_wrapped"] == 0
    assert "Cannot pass `adapter_names` on a model sharded by transformers" in errors["mixed_batch"]


def test_esft_under_transformers_fsdp2_alone_equals_one_process(two_ranks, models, tmp_path):
    grad_norms = []
    single, losses = one_process(models, "qwen3_moe", tmp_path / "single", grad_norms)
    got = two_ranks / "fsdp" / "qwen3_moe"
    assert json.loads((got / "losses.json").read_text()) == pytest.approx(losses, abs=ATOL)
    assert json.loads((got / "grad_norms.json").read_text()) == pytest.approx(grad_norms, rel=ATOL)
    assert_same_adapter(tmp_path / "single", got)
    expected, ep = ep_worker.logits(single), torch.load(got / "ep_logits.pt")
    for name in ("trained", "reloaded", "merged"):
        torch.testing.assert_close(ep[name], expected, atol=ATOL, rtol=0, msg=name)


def test_pesc_under_transformers_fsdp2_equals_one_process(two_ranks, models, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(models / "llama", dtype=torch.float32)
    model = ep_worker.pesc_model(base)
    losses = ep_worker.train(model, lr=ep_worker.PESC_LR)
    model.save_pretrained(tmp_path / "single")
    assert json.loads((two_ranks / "pesc_llama" / "losses.json").read_text()) == pytest.approx(losses, abs=ATOL)
    assert_same_adapter(tmp_path / "single", two_ranks / "pesc_llama")


@pytest.fixture(scope="module")
def trainer_two_ranks(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ep2_trainer")
    torchrun(2, ["--models", models, "--out", out, "--families", "--trainer", *ep_worker.TRAINER_FAMILIES])
    return out / "trainer"


@pytest.mark.parametrize("family", ep_worker.TRAINER_FAMILIES)
def test_trainer_under_ep_equals_one_process(trainer_two_ranks, models, tmp_path, family):
    """transformers.Trainer on the EP-loaded model, nothing extra called: gradient accumulation, clipping by the
    global norm, the ESFT authors' weight decay and save_model on every rank give the one-process adapter."""
    base = AutoModelForCausalLM.from_pretrained(models / family, dtype=torch.float32)
    expected = ep_worker.trainer_train(get_peft_model(base, ep_worker.esft_config(family, base)), family,
                                       tmp_path / "single")
    got = json.loads((trainer_two_ranks / family / "history.json").read_text())
    assert got["hooked"] == 0  # Trainer's own broadcast/all-reduce skipped every (DTensor) delta
    assert len(got["history"]) == len(expected) == ep_worker.TRAINER_STEPS
    for step, entry in zip(got["history"], expected):
        assert entry["grad_norm"] > ep_worker.MAX_GRAD_NORM[family]  # clipping was active
        assert step["grad_norm"] == pytest.approx(entry["grad_norm"], rel=1e-5)
        assert step["loss"] == pytest.approx(entry["loss"], abs=ATOL)
    assert_same_adapter(tmp_path / "single", trainer_two_ranks / family)


def test_four_ranks_equal_one_process(models, tmp_path):
    family = "qwen3_moe"
    torchrun(4, ["--models", models, "--out", tmp_path / "ep4", "--families", family])
    grad_norms = []
    single, losses = one_process(models, family, tmp_path / "single", grad_norms)
    assert json.loads((tmp_path / "ep4" / family / "losses.json").read_text()) == pytest.approx(losses, abs=ATOL)
    got_norms = json.loads((tmp_path / "ep4" / family / "grad_norms.json").read_text())
    assert got_norms == pytest.approx(grad_norms, rel=ATOL)
    assert_same_adapter(tmp_path / "single", tmp_path / "ep4" / family)
    ep = torch.load(tmp_path / "ep4" / family / "ep_logits.pt")
    torch.testing.assert_close(ep["merged"], ep_worker.logits(single), atol=ATOL, rtol=0)

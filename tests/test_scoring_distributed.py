"""Scoring under torch.distributed: two CPU processes on gloo give the single-process scores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_families import make_model

from esft_peft.scoring import ExpertScores, score_experts

WORLD_SIZE = 2


def examples() -> list[dict]:
    """Ragged tokenized examples, some with prompt labels masked, an odd count so the shards differ in size."""
    g = torch.Generator().manual_seed(7)
    data = []
    for i in range(9):
        ids = torch.randint(3, 96, (int(torch.randint(4, 20, (1,), generator=g)),), generator=g).tolist()
        labels = [-100] * (i % 3) + ids[i % 3 :]
        data.append({"input_ids": ids, "labels": labels})
    return data


def batches() -> list[dict]:
    g = torch.Generator().manual_seed(8)
    return [{"input_ids": torch.randint(3, 96, (2, 10), generator=g)} for _ in range(5)]


def run_scoring() -> dict[str, ExpertScores]:
    model = make_model("deepseek_v3")
    common = dict(token_budget=None, batch_size=1, show_progress=False)
    return {
        "tokens": score_experts(model, examples(), **common),
        "sequences": score_experts(model, examples(), average="sequences", **common),
        "batches": score_experts(model, batches(), **common),
    }


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    try:
        results = run_scoring()
        if rank == 0:
            for name, scores in results.items():
                scores.save(Path(out) / f"{name}.json")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_processes_equal_a_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    single = run_scoring()
    for name, expected in single.items():
        shared = ExpertScores.load(tmp_path / f"{name}.json")
        assert shared.metadata["world_size"] == 2 and expected.metadata["world_size"] == 1
        assert shared.expert_counts == expected.expert_counts
        assert shared.token_counts == expected.token_counts
        assert shared.num_sequences == expected.num_sequences
        assert shared.metadata["data_fingerprint"] == expected.metadata["data_fingerprint"]
        assert shared.renormalized == expected.renormalized and shared.weight_scale == expected.weight_scale
        for key in expected.layers:
            assert shared.token_scores[key] == pytest.approx(expected.token_scores[key], rel=1e-12, abs=1e-15)
            # float32 forwards on 1 vs 2 threads differ in the last bits of the weights
            assert shared.gate_scores[key] == pytest.approx(expected.gate_scores[key], rel=1e-6, abs=1e-9)
            assert shared.weight_sums[key] == pytest.approx(expected.weight_sums[key], rel=1e-6)

"""Writes the legacy ESFT adapters in this folder (run once, with the release whose format they pin).

Each ``esft_<name>/`` holds an adapter saved by that release (``esft_delta`` keys, its ``adapter_config.json``
fields) with random non-zero deltas, and ``expected.safetensors``: fixed ``input_ids``, the base model's logits and
the adapter model's logits. tests/test_legacy_adapters.py rebuilds each base from ``LEGACY_CASES`` and checks that
today's code loads the adapter and reproduces the logits.

    cd tests && PYTHONPATH=../src python data/legacy/make_legacy_esft.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import get_peft_model
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/, for tiny_families

from tiny_families import make_model  # noqa: E402

from esft_peft import ESFTConfig  # noqa: E402

# name -> (family, base seed, ESFTConfig kwargs). The test imports this table, so the bases are rebuilt the same way.
LEGACY_CASES: dict[str, tuple[str, int, dict]] = {
    "qwen3_moe": ("qwen3_moe", 0, dict(experts={"0": [1, 6], "1": [3]})),
    "deepseek_v2_shared_router": (
        "deepseek_v2", 1, dict(experts={"1": [0, 5], "2": [7]}, train_shared_experts=True, train_router=True)
    ),
    "modulelist": ("modulelist", 2, dict(experts={"1": [0, 3]})),
}
INPUT_SEED = 123
INPUT_SHAPE = (2, 8)
VOCAB = 96  # the vocabulary of every tiny family used here (tests/tiny_families.py, tests/modulelist_moe.py)


def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, INPUT_SHAPE, generator=torch.Generator().manual_seed(INPUT_SEED))


def main() -> None:
    for name, (family, seed, kwargs) in LEGACY_CASES.items():
        out = HERE / f"esft_{name}"
        ids = input_ids()
        with torch.no_grad():
            base_logits = make_model(family, seed=seed)(input_ids=ids).logits
        torch.manual_seed(1000 + seed)  # init_weights=False draws the deltas from torch's global generator
        model = get_peft_model(make_model(family, seed=seed), ESFTConfig(init_weights=False, **kwargs))
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert (logits - base_logits).abs().max() > 1e-3, name
        model.save_pretrained(out)
        (out / "README.md").unlink(missing_ok=True)
        save_file({"input_ids": ids, "base_logits": base_logits.contiguous(), "logits": logits.contiguous()},
                  str(out / "expected.safetensors"))
        print(name, sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
    main()

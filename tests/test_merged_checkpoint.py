"""A merged ESFT model saved with ``save_pretrained`` is a drop-in for the base checkpoint (what vLLM/SGLang load):
the same tensor names, shapes and dtypes (transformers 5 writes fused experts back per expert), with only the
selected experts' tensors changed.

One dtype difference is transformers' own, and happens without any adapter: deepseek_v2 keeps its router in float32
(``_keep_in_fp32_modules_strict = ["gate.weight"]``), so a bf16 checkpoint loaded and saved by transformers, merged or
not, writes ``mlp.gate.weight`` in float32. The test holds the merged checkpoint to the base checkpoint's names and
shapes, and to the dtypes transformers writes for the unadapted base."""

import json
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from esft_peft import ESFTConfig
from tiny_families import make_model


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            found.update({key: handle.get_tensor(key) for key in handle.keys()})
    return found


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v2"])
def test_merged_checkpoint_has_the_base_checkpoints_layout(family, tmp_path):
    make_model(family).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype="auto").save_pretrained(tmp_path / "resaved")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype="auto")
    layer = "1" if family == "deepseek_v2" else "0"
    model = get_peft_model(base, ESFTConfig(experts={layer: [2, 5]}, init_weights=False))
    model.merge_and_unload().save_pretrained(tmp_path / "merged")

    before, after, resaved = tensors(tmp_path / "base"), tensors(tmp_path / "merged"), tensors(tmp_path / "resaved")
    assert sorted(after) == sorted(before)
    assert all(after[k].shape == before[k].shape and after[k].dtype == resaved[k].dtype for k in before)
    upcast = sorted(k for k in before if resaved[k].dtype != before[k].dtype)  # transformers' doing, see above
    assert upcast == ([k for k in sorted(before) if k.endswith("mlp.gate.weight")] if family == "deepseek_v2" else [])
    changed = sorted(k for k in before if not torch.equal(after[k], resaved[k]))
    assert changed and all(f"layers.{layer}." in k and ".experts." in k for k in changed), changed
    assert {k.split(".experts.")[1].split(".")[0] for k in changed} == {"2", "5"}  # per-expert keys, as on the Hub
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["model_type"] == family

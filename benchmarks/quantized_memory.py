"""Peak training memory and step time of ESFT on a 4-bit (nf4) base against a bf16 base.

    python benchmarks/quantized_memory.py [--layers 8 --experts 64 --top-k 6 --selected 6 --hidden 256 --inner 128
                                           --batch 2 --seq 128 --steps 3] [--bf16-deltas] [--delta-rank R]
                                          [--attention lite --heads 16] [--gradient-checkpointing]
                                          [--device cuda [--load cuda]] [--json OUT]

A DeepSeek-V2-shaped model (fine-grained routed experts, 2 shared experts, MLA attention, first layer dense) at a
small hidden size, saved in bf16 and loaded twice: as it is (bf16 base), and with
``BitsAndBytesConfig(load_in_4bit=True, nf4, double quant, bf16 compute)`` (4-bit base; ESFT then holds the
unselected routed experts in 4-bit). Both get the same ESFT adapter (``--selected`` experts per MoE layer, seeded;
fp32 deltas, esft-peft's default for a bf16 base, or bf16 with ``--bf16-deltas``; low rank with ``--delta-rank``)
and train with AdamW on the same
batches.

What is measured (exact accounting of tensor bytes; CPU has no allocator statistics):

- static: every distinct tensor storage the model and the optimizer hold after a warm-up step (weights, 4-bit
  stores, deltas, AdamW state);
- step peak: the most bytes of tensors allocated during one training step (forward, backward, optimizer step) that
  are alive at once, tracked op by op with a ``TorchDispatchMode`` (activations, saved-for-backward tensors,
  gradients, and the transient dequantized experts the 4-bit base forms during a call);
- peak = static + step peak; the ratio is 4-bit / bf16. Step time: median of ``--steps`` timed steps, untracked.

With ``--device cuda`` the allocator's own statistics are used: static is what is allocated after a warm-up step,
peak is ``torch.cuda.max_memory_allocated`` over a training step; the step time is taken with
``torch.cuda.synchronize``. ``--load cpu`` (the default) follows the recipe of docs/training.md: the model is loaded
and wrapped on the CPU (the 4-bit base's experts are quantized there, by bitsandbytes' CPU kernel), then moved with
``model.to("cuda")``; ``load_peak`` is ``max_memory_allocated`` over the move (the accelerator never holds the bf16
experts of the 4-bit base). ``--load cuda`` loads with ``device_map="cuda"`` and wraps there (faster; the bf16
experts pass through the GPU while loading, so no load peak is reported).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from esft_peft import ESFTConfig, find_moe_layers


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages allocated under this mode that are still alive; ``peak`` is their maximum.
    Storages in ``held`` (those of the weights and optimizer state, seen again through views) are not counted."""

    def __init__(self, held: set[int]) -> None:
        super().__init__()
        self.held = held
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def _sweep(self) -> None:
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.live and ref.cdata not in self.held and storage.nbytes():
                    self.live[ref.cdata] = (ref, storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def held_storages(*objects: Any) -> dict[int, int]:
    """Distinct storages (id -> bytes) of every tensor in the modules / optimizers given."""
    seen: dict[int, int] = {}
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            tensors = list(obj.parameters()) + list(obj.buffers())
        else:
            tensors = [t for state in obj.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
        for tensor in tensors:
            storage = tensor.untyped_storage()
            seen[StorageWeakRef(storage).cdata] = storage.nbytes()
    return seen


ATTENTION = {  # MLA widths: small (the CPU default) and DeepSeek-V2-Lite's
    "small": dict(kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=64, v_head_dim=64),
    "lite": dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128),
}


def base_config(args: argparse.Namespace) -> Any:
    return AutoConfig.for_model(
        "deepseek_v2", vocab_size=args.vocab, hidden_size=args.hidden,
        intermediate_size=args.intermediate or 4 * args.inner, moe_intermediate_size=args.inner,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        n_routed_experts=args.experts, num_experts_per_tok=args.top_k, n_shared_experts=2, first_k_dense_replace=1,
        q_lora_rank=None, **ATTENTION[args.attention], topk_method="greedy", n_group=1, topk_group=1,
        max_position_embeddings=2 * args.seq, tie_word_embeddings=False,
    )


def selection(model: torch.nn.Module, args: argparse.Namespace) -> dict[str, list[int]]:
    rng = random.Random(0)
    return {key: sorted(rng.sample(range(layer.num_experts), args.selected))
            for key, layer in find_moe_layers(model).items()}


def load(folder: str, four_bit: bool, device_map: str | None = None) -> torch.nn.Module:
    quantization = None
    if four_bit:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=quantization,
                                                device_map=device_map)


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(folder: str, four_bit: bool, args: argparse.Namespace) -> dict[str, float]:
    on_gpu = args.device == "cuda" and args.load == "cuda"
    model = load(folder, four_bit, device_map="cuda" if on_gpu else None)
    model = get_peft_model(model, ESFTConfig(experts=selection(model, args), delta_rank=args.delta_rank),
                           autocast_adapter_dtype=not args.bf16_deltas)
    if args.gradient_checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    figures: dict[str, float] = {}
    if args.device == "cuda" and not on_gpu:
        torch.cuda.reset_peak_memory_stats()
        model.to("cuda")
        figures["load_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(i))
               .to(args.device) for i in range(args.steps + 2)]
    step(model, optimizer, batches[0])  # warm-up: the optimizer state exists from here on
    held = held_storages(model, optimizer)
    if args.device == "cuda":
        synchronize(args.device)
        static = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(model, optimizer, batches[1])
        synchronize(args.device)
        peak = torch.cuda.max_memory_allocated()
    else:
        static = sum(held.values())
        with LiveBytes(set(held)) as tracker:
            step(model, optimizer, batches[1])
        peak = static + tracker.peak
    times = []
    for ids in batches[2:]:
        synchronize(args.device)
        start = time.perf_counter()
        step(model, optimizer, ids)
        synchronize(args.device)
        times.append(time.perf_counter() - start)
    experts = [m for name, m in model.named_modules() if name.endswith("mlp.experts.base_layer")]
    deltas = [p for p in model.parameters() if p.requires_grad]
    adapter = sum(p.numel() * p.element_size() for p in deltas) + sum(held_storages(optimizer).values())
    figures.update({
        "static_mib": static / 2**20,
        "adapter_and_optimizer_mib": adapter / 2**20,
        "step_peak_mib": (peak - static) / 2**20,
        "peak_mib": peak / 2**20,
        "routed_experts_mib": sum(held_storages(*experts).values()) / 2**20,
        "step_s": statistics.median(times),
    })
    del model, optimizer
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--selected", type=int, default=6, help="experts per MoE layer the adapter trains")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--inner", type=int, default=128, help="moe_intermediate_size")
    parser.add_argument("--intermediate", type=int, default=None, help="the dense layer's width (default 4 x --inner)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--attention", choices=tuple(ATTENTION), default="small", help="MLA widths (lite: V2-Lite's)")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bf16-deltas", action="store_true",
                        help="deltas (and AdamW state) in bf16 (autocast_adapter_dtype=False); default fp32")
    parser.add_argument("--delta-rank", type=int, default=None,
                        help="low-rank deltas of this rank on both bases (ESFTConfig.delta_rank); default full rank")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: load and wrap on the CPU, move to the GPU, measure with the allocator's statistics")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in backward")
    parser.add_argument("--load", choices=("cpu", "cuda"), default="cpu",
                        help="with --device cuda: load and wrap on the CPU then move (the recipe), or load on the GPU")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        with torch.device(args.device):  # random init on the GPU when there is one (fast at real widths)
            AutoModelForCausalLM.from_config(base_config(args), dtype=torch.bfloat16).save_pretrained(folder)
        results = {"bf16": measure(folder, False, args), "nf4": measure(folder, True, args)}
    results["peak_ratio"] = results["nf4"]["peak_mib"] / results["bf16"]["peak_mib"]
    results["step_time_ratio"] = results["nf4"]["step_s"] / results["bf16"]["step_s"]
    results["settings"] = vars(args) | {"json": None, "selected_share": args.selected / args.experts}
    for base in ("bf16", "nf4"):
        figures = results[base]
        print(f"{base:>5} base: peak {figures['peak_mib']:8.1f} MiB (static {figures['static_mib']:.1f}, step "
              f"{figures['step_peak_mib']:.1f}; routed experts {figures['routed_experts_mib']:.1f}, deltas + AdamW "
              f"{figures['adapter_and_optimizer_mib']:.1f}), "
              f"step {figures['step_s'] * 1000:.0f} ms"
              + (f", load peak {figures['load_peak_mib']:.1f} MiB" if "load_peak_mib" in figures else ""))
    print(f"peak ratio 4-bit / bf16: {results['peak_ratio']:.3f}x; step time ratio: {results['step_time_ratio']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

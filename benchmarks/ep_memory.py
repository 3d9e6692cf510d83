"""Bytes each rank holds for ESFT under transformers' expert parallelism: routed experts, deltas, optimizer state.

    python benchmarks/ep_memory.py                      # ep = 1, 2, 4 on CPU (gloo), a small DeepSeek-V2-shaped model
    python benchmarks/ep_memory.py --ep 1 2 --json out.json
    python benchmarks/ep_memory.py --ep 1 --preset lite --device cuda   # one GPU: DeepSeek-V2-Lite widths, bf16

A DeepSeek-V2-shaped model (MLA attention, 2 shared experts, top-6 routing, first layer dense; widths scaled down) is
saved once; ``ep = 1`` loads it in one process, ``ep = N`` in ``N`` processes (``torchrun``) with
``DistributedConfig(ep_size=N, fsdp_size=N)``. ESFT selects 4 of the 16 routed experts of each MoE layer (spread over
the ranks) and trains the shared experts; one AdamW step creates the optimizer state. Each rank reports the bytes of
the tensors it holds (their local shards): routed-expert weights, ESFT deltas (expert rows it owns plus replicated
deltas), AdamW state, and the dense base weights (FSDP2 shards). Target: routed-expert bytes per rank <= 1/ep + 5%
of the one-process figure.

``--preset lite`` uses DeepSeek-V2-Lite's widths (hidden 2048, 64 routed experts of width 1408, its MLA attention;
4 layers, bf16) and selects 6 of the 64 experts. ``--device cuda`` loads each rank's shards on its GPU
(``cuda:LOCAL_RANK``, NCCL: one GPU per rank) and adds the allocator's peak over the training step.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CONFIG = dict(
    vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=6,
    first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=32,
    v_head_dim=32, topk_method="greedy", n_group=1, topk_group=1, max_position_embeddings=256,
    tie_word_embeddings=False,
)
SELECTED = [0, 5, 10, 15]  # per MoE layer: one expert on each of 4 ranks
PRESETS = {
    "small": (CONFIG, SELECTED, torch.float32),
    "lite": (CONFIG | dict(vocab_size=32000, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                           n_routed_experts=64, num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512,
                           qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128),
             [0, 11, 22, 33, 44, 55], torch.bfloat16),
}


def local_bytes(tensor: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def measure(model_dir: Path, ep: int, preset: str, device: str) -> dict:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from esft_peft import ESFTConfig, find_moe_layers

    config, selected, dtype = PRESETS[preset]
    kwargs = {"device_map": f"cuda:{os.environ.get('LOCAL_RANK', 0)}"} if device == "cuda" and ep == 1 else {}
    if ep > 1:
        from transformers.distributed import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(ep_size=ep, fsdp_size=ep)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs)
    layers = find_moe_layers(base)
    experts = {id(p) for layer in layers.values() for p in base.get_submodule(layer.experts_name).parameters()}
    model = get_peft_model(base, ESFTConfig(experts={key: selected for key in layers}, train_shared_experts=True))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    rank = int(os.environ.get("RANK", 0))
    ids = torch.randint(0, config["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(rank))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model(input_ids=ids.to(base.device), labels=ids.to(base.device)).loss.backward()
    optimizer.step()
    routed_deltas = sum(local_bytes(p) for n, p in model.named_parameters() if p.requires_grad and ".experts." in n)
    state = sum(local_bytes(t) for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return {
        "ep": ep,
        "rank": rank,
        "routed_expert_bytes": sum(local_bytes(p) for p in model.parameters() if id(p) in experts),
        "delta_bytes": sum(local_bytes(p) for p in trainable),
        "routed_delta_bytes": routed_deltas,
        "optimizer_bytes": state,
        "dense_base_bytes": sum(local_bytes(p) for p in model.parameters()
                                if id(p) not in experts and not p.requires_grad),
        **({"cuda_peak_bytes": torch.cuda.max_memory_allocated()} if device == "cuda" else {}),
    }


def worker(model_dir: Path, out: Path, preset: str, device: str) -> None:
    torch.set_num_threads(1)
    ep = int(os.environ.get("WORLD_SIZE", 1))
    result = measure(model_dir, ep, preset, device)
    (out / f"ep{ep}_rank{result['rank']}.json").write_text(json.dumps(result))


def launch(model_dir: Path, out: Path, ep: int, preset: str, device: str) -> None:
    script = [str(Path(__file__).resolve()), "--worker", str(model_dir), "--out", str(out), "--preset", preset,
              "--device", device]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if ep == 1:
        subprocess.run([sys.executable, *script], check=True, env=env)
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ep), "--master-port", str(port),
               *script]
    subprocess.run(command, check=True, env=env)


def table(results: list[dict]) -> str:
    one = next(r for r in results if r["ep"] == 1)["routed_expert_bytes"]
    mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    cuda = "cuda_peak_bytes" in results[0]
    lines = ["| ep | rank | routed experts MiB | share of ep=1 | target <= | ESFT deltas MiB (routed) "
             "| AdamW state MiB | dense base MiB |" + (" CUDA peak MiB |" if cuda else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if cuda else "")]
    for r in sorted(results, key=lambda r: (r["ep"], r["rank"])):
        share = r["routed_expert_bytes"] / one
        lines.append(f"| {r['ep']} | {r['rank']} | {mib(r['routed_expert_bytes'])} | {share:.4f} | "
                     f"{1 / r['ep'] + 0.05:.4f} | {mib(r['delta_bytes'])} ({mib(r['routed_delta_bytes'])}) | "
                     f"{mib(r['optimizer_bytes'])} | {mib(r['dense_base_bytes'])} |"
                     + (f" {mib(r['cuda_peak_bytes'])} |" if cuda else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--preset", choices=tuple(PRESETS), default="small",
                        help="model widths: small (CPU, fp32) or lite (DeepSeek-V2-Lite's widths, 4 layers, bf16)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: one GPU per rank (NCCL)")
    parser.add_argument("--json", type=Path, help="write every rank's figures here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.out, args.preset, args.device)
        return
    if args.device == "cuda" and max(args.ep) > torch.cuda.device_count():
        parser.error(f"--device cuda needs one GPU per rank: --ep {max(args.ep)} > {torch.cuda.device_count()} GPUs")
    from transformers import AutoConfig, AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, out = Path(tmp) / "model", Path(tmp) / "out"
        out.mkdir()
        torch.manual_seed(0)
        config, _, dtype = PRESETS[args.preset]
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("deepseek_v2", **config), dtype=dtype)
        model.save_pretrained(model_dir)
        del model
        for ep in sorted(set(args.ep) | {1}):
            launch(model_dir, out, ep, args.preset, args.device)
        results = [json.loads(path.read_text()) for path in sorted(out.glob("*.json"))]
    print(table(results))
    one = next(r for r in results if r["ep"] == 1)["routed_expert_bytes"]
    missed = [r for r in results if r["routed_expert_bytes"] > (1 / r["ep"] + 0.05) * one]
    print("target met" if not missed else f"target missed on {len(missed)} rank(s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

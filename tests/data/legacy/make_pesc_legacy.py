# Wrote tests/data/legacy/pesc_* with the code of commit c9ac181 (keys lora_pesc_*, prefix "lora"). Kept as a record
# of how the files were made; do not rerun it to "refresh" them: their point is to stay as that release wrote them.
import sys, torch
sys.path.insert(0, "tests")
from safetensors.torch import save_file
from peft import get_peft_model
from esft_peft import PESCConfig
from tiny_dense import make_dense_model

def make(name, family, **cfg):
    base = make_dense_model(family, seed=0)
    config = PESCConfig(num_experts=4, top_k=2, adapter_dim=8, adapter_dropout=0.0, **cfg)
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    model.eval()
    input_ids = torch.randint(0, 96, (2, 6), generator=gen)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    out = f"tests/data/legacy/pesc_{name}"
    model.save_pretrained(out)
    save_file({"input_ids": input_ids, "logits": logits.contiguous()}, f"{out}/expected_outputs.safetensors")
    print(name, sorted(model.state_dict().keys())[:3], [k for k in model.state_dict() if "lora_pesc" in k or "lora_A" in k][:4])

make("plain", "llama")
make("lora", "llama", lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["q_proj", "down_proj"])

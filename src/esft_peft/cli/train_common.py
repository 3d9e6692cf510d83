"""What `esft-peft train` does the same way for ESFT and PESC: Trainer overrides from the options, and writing the
trained adapter (one atomic directory, on the main process only)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Optional


def training_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainingArguments the command-line options set (options left unset keep the method's defaults)."""
    return {
        key: value for key, value in {
            "max_steps": args.max_steps, "learning_rate": args.learning_rate,
            "per_device_train_batch_size": args.batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps, "seed": args.seed,
            "logging_steps": args.logging_steps,
        }.items() if value is not None
    }


def save_trained_adapter(args: argparse.Namespace, trainer: Any, model: Any, tokenizer: Any,
                         state_dict: Optional[dict] = None, extra: Optional[Callable[[Path], None]] = None) -> None:
    """Write the adapter, tokenizer, trainer state and model card atomically to ``args.out`` (``args.overwrite``
    decides whether an existing directory may be replaced); ``extra`` writes more files into the same directory."""
    from ..files import atomic_directory_write
    from ..interop.hub import readable_size, write_model_card

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        trainer.state.save_to_json(str(tmp / "trainer_state.json"))
        write_model_card(model, tmp)

    if trainer.is_world_process_zero():
        atomic_directory_write(args.out, write, overwrite=args.overwrite)
        weights = Path(args.out) / "adapter_model.safetensors"
        size = f" ({readable_size(weights.stat().st_size)} of weights)" if weights.is_file() else ""
        print(f"adapter -> {args.out}{size}")
    trainer.accelerator.wait_for_everyone()

"""The built-in offline demo (``esft-peft demo``) and its synthetic tasks."""

from .run import build_model, load_settings, pretrain_base, run_demo

__all__ = ["build_model", "load_settings", "pretrain_base", "run_demo"]

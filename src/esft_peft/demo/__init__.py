"""The built-in offline demo (``esft-peft demo``), the paper in miniature, and their synthetic domains."""

from .run import run_demo
from .settings import DemoSettings, load_settings
from .training import build_model, pretrain_base

__all__ = ["DemoSettings", "build_model", "load_settings", "pretrain_base", "run_demo"]

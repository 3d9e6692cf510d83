"""peft tuners: one sub-package per method (``config.py``, ``layer.py``, ``model.py``), registered with peft."""

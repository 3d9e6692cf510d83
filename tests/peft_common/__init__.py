"""peft's generic tests (``PeftCommonTester``), vendored from huggingface/peft; see the header of each file."""

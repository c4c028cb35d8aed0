"""`mllm export`: a Hugging Face transformers model folder from a trained checkpoint.

- folder.py: `export_run`, the command's core (weights split and renamed, config.json,
  tokenizer files, generation_config.json, the model card, written as one folder atomically);
- configuration_mllm.py, modeling_mllm.py: the remote code copied as is into the folder; they
  stand alone (torch + transformers) and are not imported by mllm itself.
"""

from mllm.export.folder import export_run

__all__ = ["export_run"]

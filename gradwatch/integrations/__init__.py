"""Callbacks that run a gradwatch session inside a training framework's loop.

Each submodule imports its framework when it is imported, so ``import
gradwatch`` never needs Lightning or Hugging Face Transformers:

- :mod:`gradwatch.integrations.lightning`: ``GradwatchCallback`` for a
  ``lightning.pytorch.Trainer`` (extra ``gradwatch[lightning]``).
- :mod:`gradwatch.integrations.transformers`: ``GradwatchCallback`` for a
  ``transformers.Trainer`` (extra ``gradwatch[transformers]``).
"""

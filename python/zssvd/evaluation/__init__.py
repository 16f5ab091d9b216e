"""Measuring a model: perplexity (``evaluate``), lm-evaluation-harness (``harness``), plots of a
report (``plots``), serving speed and memory (``serve``) and the demo (``demo``)."""

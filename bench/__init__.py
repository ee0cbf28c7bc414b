"""Benchmarks of LoRA Deck: `python -m bench [--only NAME...] [--quick]` (see bench/__main__.py)."""

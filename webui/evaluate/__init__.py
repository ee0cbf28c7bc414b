"""Evaluation: the base model and each adapter or weighted stack measured on the same data, side by side.

inputs.py reads the dataset (training's own formats and loss masking, through the loaded Engine's tokenizer)
and the prompt list; stats.py turns per-token log-probabilities into loss, perplexity and a bootstrap interval
for each difference to the base; run.py runs it all on an Engine (progress, cancellation) and writes the
report; page.py renders the report as one self-contained HTML page. `python -m webui eval` and the Evaluate
tab are thin callers of run.py."""

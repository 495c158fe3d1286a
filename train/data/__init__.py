"""Data: the user's text (sources -> tokenizer -> prepared tokens -> packed sequences ->
Grain -> per-host rows -> global batches), or the embedded stdlib corpus.

- resolve.py: `resolve_data(cfg)` settles where the tokens come from and the vocabulary
  size; the tokenizer a run was trained with.
- batches.py: `make_batches(...)` gives the train loop `batch(step)` and `eval_batch(i)`.
- sources.py (files -> documents), tokenizer.py, prepared.py (tokens on disk),
  packing.py (sequences), stdlib.py (the embedded corpus).

Nothing is imported here, so a module that only reads a tokenizer does not load Grain.
"""

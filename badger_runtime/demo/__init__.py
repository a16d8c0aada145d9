"""`badger demo`: the paper's experiments re-run with the shipped policies, as figures.

- ``run.py``: the sub-demos (main, guessing, dimensions, growing, communication); each
  rolls out episodes with the deploy engine (numpy + onnxruntime; no torch), computes the
  baselines on the same episodes and returns its numbers and the figures it wrote.
- ``figures.py``: the plotting functions (matplotlib, Agg canvas, no pyplot state), one
  per paper figure, each with a caption saying what the paper reports.
- ``cli.py``: the ``badger demo`` subcommand (rich tables, ``results.json``).
"""

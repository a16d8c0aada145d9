"""`badger demo`: the paper's experiments re-run with the shipped policies, as figures.

- ``run.py``: the sub-demos (main, guessing, dimensions, growing, communication, fewshot); each
  rolls out episodes with the deploy engine (numpy + onnxruntime; no torch), computes the
  baselines on the same episodes and returns its numbers and the figures it wrote.
- ``figures.py``: the plotting functions (matplotlib, Agg canvas, no pyplot state), one
  per paper figure, each with a caption saying what the paper reports.
- ``cli.py``: the ``badger demo`` subcommand (rich tables, ``results.json``).
"""

# Defaults live here (not in run.py) so that registering the CLI imports no matplotlib.
DEFAULT_POLICY = "policies/guessing-converge-v2.onnx"  # paper Fig. 9 setting (v1 + grown experts in training): the main demo
DEFAULT_ONE_EXPERT_POLICY = "policies/guessing-one-expert-v2.onnx"  # paper Fig. 6 / 8 setting (v1 + grown experts)
DEFAULT_DIMS_POLICY = "policies/dimensions-v6.onnx"  # paper Fig. 7 (scalar feedback, trained d in [1, 6])
DEFAULT_GROW_POLICY = "policies/scale-v2.onnx"  # issue 13: error falls as experts join (trained N in [4, 32], d in [16, 128])
DEFAULT_FEWSHOT_POLICY = "policies/fewshot-v6.onnx"  # online few-shot classification (issue 14; learned rule, safe to grow)
DEMOS = ("main", "guessing", "dimensions", "growing", "communication", "fewshot")

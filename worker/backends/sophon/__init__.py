"""The BM1684X: bmodels compiled by tpu-mlir, run on a card (sophon.sail) or on Sophgo's
C-model simulator (tpu-mlir's pyruntime_bm, in its own Python 3.10 process)."""

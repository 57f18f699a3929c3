"""Evaluation on the engine: question sets and scoring (evaluate.py), the judge, reports, and the
quantization report (quant_eval.py). The cases are handed in: this package never imports train/."""

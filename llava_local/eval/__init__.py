"""Evaluation on the engine: question files and multiple choice (questions.py), scoring runs
(evaluate.py), the LLaVA-Bench judge (judge.py), the Markdown report (report.py), the shapes
held-out evaluation (shapes.py) and the quantization report (quant_eval.py, quant_report.py).
What comes from train/ or convert/ is handed in by the command line: this package imports neither."""

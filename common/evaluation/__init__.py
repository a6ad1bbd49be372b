"""evaluation/: what a run's predictions say, shared by train_qwen.py and evaluate_model.py.

classification_metrics.py (accuracy, F1, confusion, baselines, the one degenerate rule),
training_health.py (findings while a run trains, with cause and fix), report.py (report.md/.html),
plots.py (charts, the bundled CJK font), provenance.py (what made a run). May import model/, text/ and
the top of common/; never serving/.
"""

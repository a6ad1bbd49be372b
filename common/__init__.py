"""What the stage scripts share, in wings by who uses them (docs/README.md draws the map):

    text/        reading users' files, the prepared data, the prompt contract
    model/       loading, memory, model files, the tiny Qwen3, batching, label scoring   (may import text/)
    evaluation/  classification metrics, training health, the report, plots, provenance (may import text/, model/)
    serving/     the engine, the worker, the wire format, limits, monitoring             (may import all above)

config.py (and config_schema.py), cli.py, logs.py, bench.py and terminal.py sit at the top: every wing
may import them, and they import no wing. A wing imports only downward; tests/test_structure.py checks it.
Importing this package does nothing else.
"""

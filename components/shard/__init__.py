"""The shard stage: `stage.py` (the work), `config.py` (its settings), `component.py` (the KFP component)."""

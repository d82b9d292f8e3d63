"""The evaluate stage: `stage.py` (the work), `config.py` (its settings), `task.py` (what its KFP task runs) and
`component.py` (the KFP component)."""

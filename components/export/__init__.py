"""The export stage: `stage.py` (the work), `config.py` (its settings), `step.py` (what its KFP component runs) and
`component.py` (the KFP component)."""

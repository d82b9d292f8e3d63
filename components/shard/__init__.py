"""The shard stage: `stage.py` (the work: `rows.py` the per-row rules, `on_ray.py` or `in_process.py` the two ways
to run them, `writer.py` one shard slot), `config.py` (its settings), `task.py` (what its KFP task runs) and
`component.py` (the KFP component)."""

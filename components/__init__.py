"""The pipeline's stages, one folder each as KFP projects lay them out: `filter`, `shard`, `train`,
`evaluate`, `export`. Each folder holds the stage's work (`stage.py`), its settings (`config.py`), its
private helpers, what its KFP task runs (`task.py`, a plain function) and the KFP component
itself (`component.py`). `common` is the shared infrastructure (storage, MLflow tracking, progress,
the config loader, the Ray runtime, the dataset format, the run context); `synthetic` is the bundled
synthetic data."""

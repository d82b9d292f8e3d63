"""Shared infrastructure of the stages: storage (local / S3), MLflow tracking, progress lines, the
strict config loader, the Ray runtime, the dataset format and the pipeline run context."""

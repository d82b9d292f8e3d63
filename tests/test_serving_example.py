"""The registered pyfunc's input example passes MLflow's own serving validation when the model is logged
(MLflow only warns when it does not: the test fails on that warning), and the served model answers it."""

from __future__ import annotations

import logging

from components.common.tracking import TrackingConfig
from components.export.config import ExportConfig
from components.export.stage import export
from tests.fixtures_model import trained_tiny  # noqa: F401  (session fixture)


def test_the_input_example_validates_as_a_serving_request(trained_tiny, tmp_path, caplog):  # noqa: F811
    import mlflow
    from mlflow.models import convert_input_example_to_serving_input

    from components.export.pyfunc import input_example

    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="serving-example")
    mlflow_log = logging.getLogger("mlflow")  # it does not propagate to the root logger: listen on it
    mlflow_log.addHandler(caplog.handler)
    try:
        result = export(trained_tiny.model_uri, trained_tiny.tokenizer_uri, str(tmp_path / "bundle"),
                        ExportConfig(registered_model_name="clip-example", num_threads=1, parity_num_images=2),
                        tracking)
    finally:
        mlflow_log.removeHandler(caplog.handler)
    assert any(r.name.startswith("mlflow") for r in caplog.records), "the handler hears MLflow's log"
    rejected = [r.getMessage() for r in caplog.records if "validate serving input example" in r.getMessage()]
    assert not rejected, rejected[0]
    model_uri = f"models:/clip-example/{result['registered_model_version']}"
    served = mlflow.models.utils._validate_serving_input(  # what log_model and the scoring server run
        model_uri, convert_input_example_to_serving_input(input_example(tmp_path / "bundle")))
    assert len(served) == 2 and served["image_embedding"][1] is not None and served["text_embedding"][1] is None

"""The script MLflow runs to get the registered video classifier ("models from code"): the model is
rebuilt from this file and the logged checkpoint, never unpickled from a Python object (unpickling can run
arbitrary code, and MLflow warns on every register that logs one). `register/job.py` hands MLflow this
file's path; nothing imports it.
"""

from mlflow.models import set_model

from pipelines.register.pyfunc import MViTVideoClassifier

set_model(MViTVideoClassifier())

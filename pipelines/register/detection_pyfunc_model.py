"""The script MLflow runs to get the registered AVA action detector ("models from code", as
pyfunc_model.py for the classifier): rebuilt from this file and the logged checkpoint, never unpickled.
`register/job.py` hands MLflow this file's path; nothing imports it.
"""

from mlflow.models import set_model

from pipelines.register.detection_pyfunc import MViTActionDetector

set_model(MViTActionDetector())

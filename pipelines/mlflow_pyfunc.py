"""The pyfunc's code, as MLflow's models-from-code logs it (copied into the model folder, run at load time;
no pickle): the image generator of ``pipelines.mlflow_model``."""

from mlflow.models import set_model

from pipelines.mlflow_model import CtrlImageModel

set_model(CtrlImageModel())

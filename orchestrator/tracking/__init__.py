"""Everything that talks to MLflow: runs, metrics, the model registry and the registered pyfunc.
The only package that imports mlflow (inside functions, except `pyfunc_model.py`, which MLflow runs)."""

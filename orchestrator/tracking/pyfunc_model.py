"""The MLflow pyfunc of a registered version (logged as code, so no cloudpickle is involved):
`predict(list of prompts, params={"max_new_tokens": N}) -> list of completions`.

An adapter version stores the adapter and resolves its base from the saved job spec; a merged
version stores the whole model. Either sits under the model's artifacts as `model`.
"""

import mlflow.models
import mlflow.pyfunc


class RegisteredModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from orchestrator.models.inference import load_adapter

        self.loaded = load_adapter(context.artifacts["model"])

    def predict(self, context, model_input, params=None):
        from orchestrator.models.inference import complete

        prompts = model_input if isinstance(model_input, list) else list(model_input.iloc[:, 0])
        max_new = int((params or {}).get("max_new_tokens", 64))
        return [complete(self.loaded, str(p), max_new_tokens=max_new) for p in prompts]


mlflow.models.set_model(RegisteredModel())

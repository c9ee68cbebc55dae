"""The MLflow pyfunc of a registered version (logged as code, so no cloudpickle is involved):
`predict(list of prompts, params={"max_new_tokens": N, "batch_size": B}) -> list of completions`,
one per prompt in order, each prompt formatted as in training and completed greedily, B at a time.

An adapter version stores the adapter and resolves its base from the saved job spec; a merged
version stores the whole model. Either sits under the model's artifacts as `model`, and loads on
a CUDA GPU when the machine has one (`models.inference.load_adapter`).
"""

import mlflow.models
import mlflow.pyfunc


class RegisteredModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from orchestrator.models.inference import load_adapter

        self.loaded = load_adapter(context.artifacts["model"])

    def predict(self, context, model_input, params=None):
        from orchestrator.models.inference import PREDICT_PARAMS, complete_batch, format_prompt

        prompts = model_input if isinstance(model_input, list) else list(model_input.iloc[:, 0])
        # A version registered before `batch_size` was a param has no default for it in its signature.
        params = {**PREDICT_PARAMS, **(params or {})}
        return complete_batch(self.loaded, [format_prompt(self.loaded, str(p)) for p in prompts],
                              int(params["max_new_tokens"]), batch_size=int(params["batch_size"]))


mlflow.models.set_model(RegisteredModel())

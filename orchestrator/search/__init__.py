"""Searches and comparisons over jobs: the search space (`space`, pure), a hyperparameter search
(`recipe`, which also dispatches a job to a search or a single run) and `compare`. Calls Ray and
MLflow only through training.launch and the tracking package."""

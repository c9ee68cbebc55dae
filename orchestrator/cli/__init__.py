"""The `orchestrator` command line: validate, run, resume, plan, generate, evaluate, serve, compare,
register, registry, and the cluster commands (submit, jobs, k8s). The only package that prints or exits.

Each command group is a module that registers its commands on `common.app`; they are imported
here in the order `orchestrator --help` lists them. Heavy libraries are imported inside the commands.
"""

from __future__ import annotations

import sys

from orchestrator.cli.common import _stdout_for_results_only, app, err

# Importing a command module registers its commands: in this order, as `--help` lists them.
from orchestrator.cli import job  # noqa: E402, F401, I001  (validate, run, resume)
from orchestrator.cli import generate  # noqa: E402, F401, I001
from orchestrator.cli import evaluate  # noqa: E402, F401, I001
from orchestrator.cli import serve  # noqa: E402, F401, I001
from orchestrator.cli import compare  # noqa: E402, F401, I001
from orchestrator.cli import registry  # noqa: E402, F401, I001  (registry ..., register)
from orchestrator.cli.cluster import jobs_app, k8s_app, submit  # noqa: E402

__all__ = ["app", "err", "main", "_stdout_for_results_only"]

app.command()(submit)
app.add_typer(jobs_app, name="jobs")
app.add_typer(k8s_app, name="k8s")

from orchestrator.cli import plan  # noqa: E402, F401  (after the cluster commands)


def main() -> None:
    import atexit
    import gc
    import logging
    import warnings

    # Registered first, so it runs last (after Ray's and MLflow's exit handlers): the objects left
    # at exit (torch, transformers, MLflow, the tokenized data) are set aside from the collections
    # the interpreter runs while it shuts down, which took 1.5-2 s after a quickstart run (the
    # process exits at once now; docs/benchmarks.md).
    atexit.register(gc.freeze)

    # Library notices that users cannot act on (an optional bitsandbytes kernel package, a
    # transformers deprecation inside peft) stay out of the console; errors still show.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    app(prog_name="orchestrator")


if __name__ == "__main__":
    sys.exit(main())

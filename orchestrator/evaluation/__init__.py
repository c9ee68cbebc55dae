"""Evaluation beyond loss, and the promotion gate: a registered version scored on a held-out file
(token-weighted loss and perplexity, exact match, ROUGE-L, chrF, BLEU), two versions compared on the
same examples, an alias moved only on that evidence. Talks to MLflow only through `tracking`;
never prints or exits (the CLI does)."""

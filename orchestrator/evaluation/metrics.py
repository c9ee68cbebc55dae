"""Generation metrics of outputs against references, from the libraries that define them
(`rouge-score` for ROUGE-L, `sacrebleu` for chrF and BLEU), and which way each metric is better."""

from __future__ import annotations

# Metrics where lower is better; every other metric is better higher.
LOWER_IS_BETTER = frozenset({"eval_loss", "perplexity"})
GENERATION_METRICS = ("exact_match", "rougeL", "chrf", "bleu")
METRICS = ("eval_loss", "perplexity", *GENERATION_METRICS)


def per_example(outputs: list[str], references: list[str]) -> list[dict[str, float]]:
    """Each output against its reference: exact match (after stripping whitespace), ROUGE-L F1
    and sentence chrF (0-100)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [{"exact_match": float(o.strip() == r.strip()),
             "rougeL": scorer.score(r, o)["rougeL"].fmeasure,
             "chrf": sacrebleu.sentence_chrf(o, [r]).score}
            for o, r in zip(outputs, references)]


def corpus(outputs: list[str], references: list[str], rows: list[dict[str, float]]) -> dict[str, float]:
    """Means of the per-example scores, with chrF and BLEU computed over the whole corpus (as
    sacrebleu defines them: statistics summed over sentences, not a mean of sentence scores)."""
    import sacrebleu

    n = max(len(rows), 1)
    return {"exact_match": sum(r["exact_match"] for r in rows) / n,
            "rougeL": sum(r["rougeL"] for r in rows) / n,
            "chrf": sacrebleu.corpus_chrf(outputs, [references]).score,
            "bleu": sacrebleu.corpus_bleu(outputs, [references]).score}


def not_worse(metric: str, candidate: float, incumbent: float) -> bool:
    """Whether `candidate` is at least as good as `incumbent` on `metric`."""
    return candidate <= incumbent if metric in LOWER_IS_BETTER else candidate >= incumbent

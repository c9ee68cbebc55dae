"""The job's data: JSONL records -> formatted text -> token ids and labels, cached across runs.
Imports no model code, and transformers only inside `tokenize.load_tokenizer`."""

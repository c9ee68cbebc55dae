"""The models: resolve and load a base (built-in ones built locally), add and load adapters, merge,
and complete prompts. Imports torch, transformers, peft and bitsandbytes only inside functions."""

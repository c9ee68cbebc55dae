"""Serving registered versions: several adapters of one base behind an OpenAI-compatible HTTP API
on Ray Serve (`/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/v1/reload`), the base
loaded once, aliases re-resolved on reload. Generates exactly as `orchestrator generate` does
(`models.inference`). Talks to MLflow only through `tracking`; never prints or exits."""

"""Integrations with trainers: `kdops.integrations.transformers` (needs the `transformers` extra)."""

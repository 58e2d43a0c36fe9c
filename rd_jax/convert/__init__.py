"""Checkpoint converters: Hugging Face / diffusers directories -> rd_jax params.

Each converter reads safetensors directly (never pickle, never
`trust_remote_code`) and writes an Orbax checkpoint plus the rd_jax config.
"""

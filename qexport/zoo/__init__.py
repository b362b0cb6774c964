"""Tiny, real demo models that run anywhere (no shared folder, no download)."""

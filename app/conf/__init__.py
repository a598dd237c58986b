"""Hydra configs shipped with the package; importing this registers the typed schema they fill in."""

from app.config import register_configs

register_configs()

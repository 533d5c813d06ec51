"""Hilum settings: defaults <- TOML file <- ``HILUM_*`` environment variables."""

from config.settings import (
    DimseSettings,
    HttpSettings,
    ServerSettings,
    Settings,
    StorageSettings,
    load_settings,
)

__all__ = [
    "DimseSettings",
    "HttpSettings",
    "ServerSettings",
    "Settings",
    "StorageSettings",
    "load_settings",
]

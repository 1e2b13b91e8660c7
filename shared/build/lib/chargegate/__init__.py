"""chargegate: EV charging manager behind a German Smart Meter Gateway (shared package)."""

__version__ = "0.1.0"

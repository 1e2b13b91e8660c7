"""evse-poller: reads and drives Modbus wallboxes and meters described by YAML device profiles."""

__all__ = ["__version__"]

__version__ = "0.1.0"

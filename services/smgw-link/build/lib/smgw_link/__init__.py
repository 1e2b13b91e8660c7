"""smgw-link: chargegate's link through the Smart Meter Gateway (HAN TLS, CLS proxy, CLS.EEDI)."""

__version__ = "0.1.0"

"""Splitting a simulated installation over several processes: shard ``K/N`` takes every N-th device from
the K-th (the simulators of evse-poller and ocpp-gateway, ``--shard``)."""

from __future__ import annotations

import argparse


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with 0 <= K < N; an ``argparse`` type (its error names the expected form)."""
    k, sep, n = text.partition("/")
    try:
        shard = (int(k), int(n))
    except ValueError:
        shard = (-1, 0)
    if not sep or not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError("give K/N with 0 <= K < N, e.g. 0/2")
    return shard

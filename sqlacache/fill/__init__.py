"""Filling a missed key: in-process single flight, cross-process leases, refresh-ahead."""

"""The near-cache: decoded entries in process memory, kept coherent by the backend's fan-out."""

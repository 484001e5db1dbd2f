"""Pure analysis, no I/O: statements → dependencies, written rows → invalidations, values → tokens."""

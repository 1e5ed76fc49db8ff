"""prunecomp."""

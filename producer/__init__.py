"""The producer side of imgpipe: scan folders, create jobs, enqueue chunks of paths by task name (no torch)."""

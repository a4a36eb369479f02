"""Tools around training: trackers, progress, monitor, profiler, notebook launcher, batch-size finder, memory estimate, system info."""

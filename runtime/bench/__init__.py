"""`runtime bench`: seeded workloads, model specs, offline and online runners, metrics, reports and
plots (see docs/benchmarks.md)."""

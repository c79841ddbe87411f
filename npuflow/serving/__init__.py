"""npuflow serve: protocol, pool, completions, routes, metrics, canary load, analysis, k8s manifests."""

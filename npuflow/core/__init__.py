"""Foundations every layer uses: config, settings, errors, artifacts (manifests), store, text, names."""

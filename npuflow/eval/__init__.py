"""Quality metrics and gates."""

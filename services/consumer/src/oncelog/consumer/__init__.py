"""oncelog consumer."""

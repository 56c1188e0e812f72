"""oncelog platform."""

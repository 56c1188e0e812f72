"""oncelog publisher."""

"""Runs oncelog on one machine: embedded servers, the `just up` supervisor, a local cluster."""

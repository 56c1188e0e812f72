"""The retention service: expires old rows in bounded transactions while ingestion goes on.

It runs apart from the consumer because deleting stored rows needs a role that may (see
docs/operations.md#retention): the consumer's `oncelog_ingest` never can.
"""

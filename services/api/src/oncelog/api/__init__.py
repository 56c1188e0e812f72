"""oncelog api."""

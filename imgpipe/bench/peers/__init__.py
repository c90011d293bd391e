"""Peers of `imgpipe bench`: the scripts users would write instead of imgpipe, kept readable to check."""

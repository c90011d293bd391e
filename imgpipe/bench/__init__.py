"""The benchmark harness (`imgpipe bench`): suites that measure imgpipe against what users would run instead."""

"""codestop's version: a leaf, so that what records it (run files, traces, the proxy) need not import the package face."""

__version__ = "0.1.0"

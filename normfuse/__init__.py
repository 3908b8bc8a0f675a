"""normfuse: exact normalization rewrites, engines, and an OIP v2 server (see README)."""

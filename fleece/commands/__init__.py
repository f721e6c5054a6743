"""One module per ``fleece`` command; each has ``register(subparsers)``."""

"""Domain services: plain async functions over the stores, called by handlers and the CLI."""

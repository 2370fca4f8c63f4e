"""ropeserve clients: the `ropeserve` command line and a small Python client."""

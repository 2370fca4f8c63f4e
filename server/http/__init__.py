"""The HTTP room: routes, what bounds a request before it is parsed, errors and streams."""

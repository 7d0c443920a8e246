"""The HTTP layer: the Flask app factory, routes, the page, metrics exposition, streams and servers."""

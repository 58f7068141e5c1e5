"""Endpoint discovery: resolvers that emit typed deltas; clusters apply them."""

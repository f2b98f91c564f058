"""How bytes move: the Backend protocol, its implementations, and compression."""

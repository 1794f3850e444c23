"""``segstream bench``: the engine measured against the limits of its own broker and Redis."""

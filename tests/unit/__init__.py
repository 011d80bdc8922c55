"""Unit tests: one module or command of the library on tiny in-memory or hand-written inputs."""

"""The test suite: a package, so that `tests.helpers` imports from a clean clone without a path hack."""

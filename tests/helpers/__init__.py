"""Test support code shared by several test modules (no tests here); data files live in tests/fixtures/."""

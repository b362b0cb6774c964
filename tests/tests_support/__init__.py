"""Helpers for the test suite: tiny factory models addressable as ``tests_support.models:<factory>``."""

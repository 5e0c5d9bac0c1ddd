"""Builders shared by the tests (imported as ``tests.helpers.<module>``); no test module imports
another test module."""

"""Carriers (SPEC §4): the file format, validation, base fingerprint, and applying one to a base model."""

"""Integrations with serving engines. Each is imported only by its engine's entry point, never by
``import lcdd_kernels``."""

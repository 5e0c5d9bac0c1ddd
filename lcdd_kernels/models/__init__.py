"""Hugging Face model support: the family table, patched modules, apply_lcdd."""

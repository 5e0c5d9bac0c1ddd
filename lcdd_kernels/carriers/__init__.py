"""Carriers (SPEC §4), one module per job: the object (carrier), its validation (validate), the file
format (layout: names; files: reading; load: load_carrier; signing), extraction and fingerprints
(extract), compatibility with a model (compat), and serving one: apply, bank, merge, export."""

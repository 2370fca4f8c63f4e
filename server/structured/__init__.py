"""Structured output: the request fields that ask for it (fields.py), which JSON schemas are served
(json_schema.py), and the compile check every constraint passes before it runs (compile_check.py).
The design, and where NBCE applies the constraint: docs/design/structured-output.md."""

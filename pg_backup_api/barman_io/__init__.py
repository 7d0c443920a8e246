"""The only code that imports Barman: its configuration, its Python API and its command lines."""

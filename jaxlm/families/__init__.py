"""Model families: one spec per family (spec.py, decoder.py, encoder.py, encoder_decoder.py)
and the registry that maps a name to it (registry.py)."""

"""D-FINE (Peng et al., 2024) on the Joiner, with Peterande/D-FINE's module names so its checkpoints load:
boxes as distributions refined layer by layer (FDR) on the real-time heads' hybrid encoder."""

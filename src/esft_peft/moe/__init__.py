"""Model structure: MoE layers, their experts layouts (the family registry) and layer keys."""

"""From a checkpoint to a bundle: the exported graph with preprocessing baked in, one writer per format,
and the int8 recipes. Kept empty so `toolkit.export.quantize` (torch-free) imports without torch."""

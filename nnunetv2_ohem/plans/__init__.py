"""Write real nnU-Net plans files: tiny plans for tests/demo, and the source papers' configurations."""

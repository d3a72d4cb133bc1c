"""Transfer learning: backbones, heads, data sets and the fine-tune loop (needs torch)."""

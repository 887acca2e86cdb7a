"""The algorithm math: pure tensor functions, no trainer state."""

"""Container Storage Interface (CSI) protocol support."""

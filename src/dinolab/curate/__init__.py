"""Data curation: embedding pools (more stages come with the curation issue)."""

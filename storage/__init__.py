"""The only package that touches the index database or the blob store."""

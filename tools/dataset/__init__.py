"""Pieces of the build-dataset tool: content hashing (`hashing`), token counts (`token_counts`),
pool preparation (`pools`), allocation and selection (`allocation`), output (`assemble`)."""

"""Tool functions over typed inputs/outputs, usable without LangGraph."""

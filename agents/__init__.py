"""LangGraph wiring and planners. Does no data work itself: nodes call `mosaic.tools`."""

"""Input data: in-memory image datasets, the generated quickstart set, batch order."""

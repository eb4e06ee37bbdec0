"""Readers of clinical files; each returns plain arrays or refuses with a BadInput naming the file."""

"""Reports: tables and JSON for people and tools, and progress of long work."""

"""Model builders, converters, student-from-teacher init, HF export and the memory plan."""

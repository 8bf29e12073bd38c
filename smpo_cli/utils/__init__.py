"""Small shared helpers (logging, paths, atomic files, run folders). No torch at import time."""

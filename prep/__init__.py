"""Stage 1a: raw pictures → a Kohya repeat folder of clean training images. Imports no torch."""

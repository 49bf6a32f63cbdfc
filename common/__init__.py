"""Below every stage: safe writes, locks, signals, picture and caption reading, the Kohya folder layout, prompt files and command-line conventions. Imports no torch."""

"""Stage 1b: sidecar captions for a prepared training folder."""

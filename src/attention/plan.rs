//! Per-layer resolution of a pipeline spec's `[attention]` table into backends.

//! Procedural training data (see README).

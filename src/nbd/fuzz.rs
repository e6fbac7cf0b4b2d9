//! Fuzz target bodies, kept in the library so that `cargo test` can replay
//! the corpus on stable Rust and `fuzz/` stays a thin wrapper.

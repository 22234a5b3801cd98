//! Criterion benchmarks that span crates (see `benches/`). They run with
//! `cargo xtask bench`, which gathers every bench's figures into one table.

//! The `ember` command line.

fn main() {}

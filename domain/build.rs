//! The migrations are embedded at compile time (`refinery::embed_migrations!`): a new or changed
//! migration file must rebuild this crate, though no Rust source changed.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}

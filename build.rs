// `sqlx::migrate!` embeds the migrations when the crate compiles; without this, adding a migration
// file would not rebuild the crate, and binaries and tests would run without it.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=examples/player_service_migrations");
}

//! `cargo run -p cairn-example-courses`: the narrated walk on a fresh store.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cairn_example_courses::demo::run().await
}

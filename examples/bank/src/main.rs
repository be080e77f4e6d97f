//! `cargo run -p cairn-example-bank`: the narrated walk on a fresh store.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cairn_example_bank::demo::run().await
}

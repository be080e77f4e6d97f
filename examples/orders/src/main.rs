//! `cargo run -p cairn-example-orders [-- --keep DIR]`: the narrated order flow
//! on a fresh store (kept in DIR, to look at with `cairn projections status`).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let keep = match std::env::args().skip(1).collect::<Vec<_>>().as_slice() {
        [] => None,
        [flag, dir] if flag == "--keep" => Some(dir.into()),
        _ => anyhow::bail!("usage: cairn-example-orders [--keep DIR]"),
    };
    cairn_example_orders::run(keep).await
}

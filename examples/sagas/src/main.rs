//! `cargo run -p cairn-example-sagas [-- --keep DIR] [--payment ok|decline|hang]`:
//! the narrated order saga on a fresh store.

use clap::Parser;

/// The order saga and a process manager, narrated, on a fresh store.
#[derive(Parser)]
struct Args {
    /// Keep the store in DIR (which must not hold one yet), to look at with `cairn sagas list`.
    #[arg(long, value_name = "DIR")]
    keep: Option<std::path::PathBuf>,
    /// Run one order with this payment behaviour instead of the whole walk.
    #[arg(long, value_enum)]
    payment: Option<cairn_example_sagas::Payment>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    cairn_example_sagas::run(args.keep, args.payment).await
}

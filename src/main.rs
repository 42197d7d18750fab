//! The `barngate` command line: a thin edge over the library.

// mimalloc, without transparent huge pages (feature `no_thp`): chunk payloads
// are allocated on the front's threads and freed on the ingest thread, and
// glibc malloc spent ~15–20 % of the gateway's CPU on that traffic (bench at
// 1,000 devices: +15 % chunk msgs/s, −12 % CPU). Huge pages had 1,000 idle
// connections cost 150+ MiB; without them the RSS stays under the target.
// `--no-default-features` builds on the system allocator.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cli;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cli::run().await
}

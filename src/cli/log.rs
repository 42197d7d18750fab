//! Logging of the subcommands that log (`serve`, `upstream` and, with the
//! `simulator` feature, `simulate`).

/// Logs to stderr through a writer thread: a wake of a thousand devices
/// logs ~10,000 lines a second, and one `write` each on the ingest and
/// front threads cost them several per cent. The thread writes what is
/// queued in 8 KiB blocks and flushes whenever the queue is empty; a full
/// queue makes the logging thread wait rather than drop lines. The queue
/// holds 4,096 lines (its slots are allocated up front: the default
/// 128,000 cost 4 MiB of resident memory). Keep the guard until exit:
/// dropping it flushes the rest.
pub(super) fn init_tracing() -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::{filter::filter_fn, prelude::*, EnvFilter};
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(4096)
        .thread_name("log-writer")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let filter = EnvFilter::try_from_env("BARNGATE_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,rumqttd=warn"));
    // rumqttd opens error-level spans around every packet (the topic
    // formatted with Debug); our log lines never show them, and they cost
    // the broker thread a few per cent. Its events still pass.
    let no_broker_spans = filter_fn(|m| !(m.is_span() && m.target().starts_with("rumqttd")));
    tracing_subscriber::registry()
        .with(filter)
        .with(no_broker_spans)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(writer)
                // Colour codes only on a terminal, not in a file or the journal.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    guard
}

//! The side-by-side benchmark and fault-injection runner (bench/RESULTS.md).
//!
//! ```text
//! cargo build --release && cargo build --release --example ceiling
//! cargo run --release --example bench -- run
//! cargo run --release --example bench -- burst      # 1,000-device wake burst, 10,000 registered
//! cargo run --release --example bench -- drain      # backlog drain: device awake time per image
//! cargo run --release --example bench -- crash      # kill -9 trials
//! cargo run --release --example bench -- load --addr 127.0.0.1:1883 --devices 10
//! ```
//!
//! Every stack runs as its own process (so its CPU seconds and peak RSS can be
//! read from /proc): the gateway is the real `barngate serve` binary, the
//! ceiling is the `ceiling` example (raw rumqttd + a local-link consumer),
//! the seed stack is Debian Mosquitto + `bench/baseline/worker.py`.
//! The load generator is in this process: D devices (the lean client, or
//! rumqttc with `--loader rumqttc`), each doing one wake (HELLO →
//! capture_image → METADATA → send_image → all chunks without per-chunk
//! application ACKs → missing_chunks / ACK_OK).
//!
//! The gateway's device listener is MQTT over mutual TLS: before starting
//! `barngate serve` the runner creates the site CA in `<data dir>/certs`
//! (`Pki::init_ca`) and issues one client certificate per device
//! (`Pki::issue_device`, on all cores) into `<data dir>/devices`; every
//! device id is a MAC (`B8F8` + 8 hex digits, distinct per scenario) and each
//! device presents `{MAC}.crt.pem` / `{MAC}.key.pem`. The ceiling and the
//! seed stack are plaintext (they have no TLS front to compare with);
//! `--gateway-plain` runs the gateway's loopback plaintext listener instead,
//! to measure what TLS costs. `load --ca FILE --cert-dir DIR` connects to an
//! external broker with certificates from `DIR`.
//!
//! The modules: `cli` (the command line), `load` (the load generator: its
//! settings, the images and chunk messages, a fleet's wake), `device` (one
//! device's wake and backlog drain), `conn` (the devices' MQTT clients),
//! `tls` (the CA and device certificates), `stack` (the stacks' processes
//! and what /proc says about them), `report` (rows, tables, the check of
//! the gateway's store), and one module per subcommand: `run`, `ab`, `burst`,
//! `drain`, `crash`, `ciphers` (`load` is run here, in `main`).

mod ab;
mod burst;
mod ciphers;
mod cli;
mod conn;
mod crash;
mod device;
mod drain;
mod load;
mod report;
mod run;
mod stack;
mod tls;

use ab::scenario_ab;
use burst::scenario_burst;
use ciphers::ciphers;
use clap::Parser;
use cli::{Cli, Cmd};
use crash::scenario_crash;
use drain::scenario_drain;
use load::{run_load, LoadCfg, LOAD_BASE};
use report::{print_table, row};
use run::scenario_run;
use stack::PIN;
use std::sync::atomic::Ordering;

// The load generator shares the two cores with the stack it measures. With
// glibc malloc it spent about 45 % of its CPU allocating and freeing (the
// ~2 KiB chunk strings, rumqttc's and rustls's buffers, freed on another
// worker thread than the one that made them); mimalloc leaves more of the
// machine to the stack under test. The stacks keep their own allocators: the
// gateway's binary is built on mimalloc too (`src/main.rs`), the ceiling (a
// separate example) uses the system one.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The load generator keeps the pages it frees (mimalloc purges them 1 s
/// after they are freed, and they are faulted in again, zeroed, on next use;
/// the set-up before a wake takes longer than that):
/// those page faults were ≈ 18 % of its CPU inside the wake. Only this
/// process: the gateway keeps its own allocator settings.
/// `BENCH_FRESH_PAGES=1` turns this and [`prefault`] off (for A/B runs).
fn keep_freed_pages() {
    if fresh_pages() {
        return;
    }
    #[cfg(feature = "mimalloc")]
    {
        use std::os::raw::{c_int, c_long};
        extern "C" {
            fn mi_option_set(option: c_int, value: c_long);
        }
        // `mi_option_purge_delay` in mimalloc v3's `include/mimalloc.h`
        // (libmimalloc-sys 0.1.49 builds v3); -1: never purge.
        const MI_OPTION_PURGE_DELAY: c_int = 15;
        // SAFETY: mimalloc is this process's allocator (above) and reads
        // its options at any time; setting one has no other effect.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
    }
}

fn fresh_pages() -> bool {
    std::env::var_os("BENCH_FRESH_PAGES").is_some()
}

/// Touches (and frees) `bytes` of memory before the devices connect, so
/// that their socket buffers, first written inside the wake, reuse pages
/// already resident (with [`keep_freed_pages`]) instead of faulting in
/// fresh ones in the measured time.
fn prefault(bytes: usize) {
    let mut v: Vec<u8> = Vec::with_capacity(bytes);
    // Non-zero: a zeroed allocation may map fresh pages without touching them.
    v.resize(bytes, 1);
    std::hint::black_box(&v);
}

fn main() {
    keep_freed_pages();
    let cli = Cli::parse();
    let pin = match &cli.cmd {
        Cmd::Run { c, .. }
        | Cmd::Ab { c, .. }
        | Cmd::Burst { c, .. }
        | Cmd::Crash { c, .. }
        | Cmd::Drain { c, .. }
        | Cmd::Load { c, .. } => c.pin,
        Cmd::Ciphers {
            size,
            records,
            rounds,
        } => {
            ciphers(*size, *records, *rounds);
            return;
        }
    };
    if pin {
        PIN.store(true, Ordering::Relaxed);
        // The load generator (this process, before its runtime starts, so
        // every thread inherits it) on CPU 1.
        // SAFETY: a zeroed cpu_set_t is valid; the call only reads it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(1, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                eprintln!("--pin: cannot move the load generator to CPU 1");
            }
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Run {
                c,
                devices,
                stacks,
                out,
                repeat,
            } => scenario_run(c, devices, stacks, out, repeat).await,
            Cmd::Ab {
                c,
                baseline_bin,
                devices,
                rounds,
            } => scenario_ab(c, baseline_bin, devices, rounds).await,
            Cmd::Burst {
                c,
                devices,
                registered,
                connect_only,
            } => scenario_burst(c, devices, registered, connect_only).await,
            Cmd::Crash {
                c,
                devices,
                trials,
                seed,
            } => scenario_crash(c, devices, trials, seed).await,
            Cmd::Drain {
                c,
                devices,
                pending,
                stacks,
                repeat,
            } => scenario_drain(c, devices, pending, stacks, repeat).await,
            Cmd::Ciphers { .. } => unreachable!("handled before the runtime starts"),
            Cmd::Load {
                c,
                addr,
                devices,
                connect_only,
                watch_pid,
            } => {
                let cfg = LoadCfg {
                    connect_only,
                    ..LoadCfg::from(&c)
                };
                let r = run_load(addr, LOAD_BASE, devices, 0, &cfg, watch_pid, watch_pid).await;
                if let Some(m) = r.connected {
                    println!(
                        "connected: {devices} devices, RSS {:.1} MiB (peak {:.1})",
                        m.rss, m.peak
                    );
                }
                print_table(&[row("target", &c, &r, 0.0, 0.0)]);
                for w in r.wakes.iter().filter(|w| w.error.is_some()).take(5) {
                    println!("{}: {:?}", w.id, w.error);
                }
            }
        }
    });
}

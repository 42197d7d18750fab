//! The simulated-time driver: a discrete-event loop that feeds an
//! in-process [`Engine`] and advances a [`ManualClock`].

use super::base::{opt_err, SimError};
use super::device::{Action, SimDevice};
use super::faults::{Faults, RestartKind};
use super::fleet::{FleetOptions, Summary};
use crate::clock::{Clock, ManualClock};
use crate::config::Config;
use crate::ingest::{Engine, Publish};
use crate::metrics::Metrics;
use crate::protocol::{self};
use crate::schedule::Schedule;
use crate::store::Store;
use chrono::{DateTime, Duration, TimeZone, Utc};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tracing::{info, warn};

// ------------------------------------------------- simulated-time driver

pub(crate) enum Ev {
    Wake(usize),
    Timer(usize, u64),
    ToGateway(String, Vec<u8>),
    ToDevice(usize, u64, Vec<u8>),
    Disconnect(usize, u64),
    Tick,
    Restart(RestartKind),
    GatewayUp,
}

/// Devices and an in-process [`Engine`] in simulated time: a priority queue
/// of wake-ups, timers and message deliveries; the [`ManualClock`] jumps
/// from one event to the next.
pub struct Simulation {
    opts: FleetOptions,
    cfg: Config,
    clock: ManualClock,
    start: DateTime<Utc>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    engine: Option<Engine>,
    devices: Vec<SimDevice>,
    by_wire: HashMap<String, usize>,
    queue: BinaryHeap<Reverse<(i64, u64)>>,
    events: HashMap<u64, Ev>,
    seq: u64,
    in_flight: usize,
    tick_scheduled: bool,
    /// Device → gateway and gateway → device latency.
    pub latency: Duration,
    /// How long a restarting gateway is away.
    pub restart_downtime: Duration,
    restarts: u64,
    max_streaming: u64,
    dropped_while_down: u64,
    /// Print a progress line every this much simulated time.
    pub progress_every: Option<Duration>,
    next_progress: DateTime<Utc>,
}

impl Simulation {
    /// A fleet against a gateway built from `cfg` over `store`, starting at `start`.
    pub fn new(
        opts: FleetOptions,
        mut cfg: Config,
        store: Arc<Store>,
        start: DateTime<Utc>,
    ) -> Result<Simulation, SimError> {
        cfg.validate()
            .map_err(|e| opt_err("config", e.to_string()))?;
        let metrics = Arc::new(Metrics::default());
        let engine = Self::engine(&cfg, &store, &metrics)?;
        let mut opts = opts;
        opts.timezone = engine.timezone();
        cfg.site.timezone = opts.timezone.name().to_string();
        let devices = opts.build_devices(start)?;
        let by_wire = devices
            .iter()
            .enumerate()
            .map(|(i, d)| (d.params.id.clone(), i))
            .collect();
        let mut sim = Simulation {
            clock: ManualClock::new(start),
            start,
            cfg,
            store,
            metrics,
            engine: Some(engine),
            devices,
            by_wire,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            seq: 0,
            in_flight: 0,
            tick_scheduled: false,
            latency: Duration::milliseconds(15),
            restart_downtime: Duration::seconds(10),
            restarts: 0,
            max_streaming: 0,
            dropped_while_down: 0,
            progress_every: None,
            next_progress: start,
            opts,
        };
        for i in 0..sim.devices.len() {
            let at = sim.opts.first_wake(i, start);
            sim.push(at, Ev::Wake(i));
        }
        for (at, kind) in sim.opts.faults.restarts.clone() {
            sim.push(at, Ev::Restart(kind));
        }
        sim.push(start, Ev::Tick);
        sim.tick_scheduled = true;
        Ok(sim)
    }

    pub(crate) fn engine(
        cfg: &Config,
        store: &Arc<Store>,
        metrics: &Arc<Metrics>,
    ) -> Result<Engine, SimError> {
        let tz = cfg
            .timezone()
            .map_err(|e| opt_err("config", e.to_string()))?;
        Ok(Engine::new(
            cfg.ingest.clone(),
            cfg.site.clone(),
            Schedule::new(&cfg.schedule, tz),
            store.clone(),
            metrics.clone(),
        )?)
    }

    pub fn clock(&self) -> &ManualClock {
        &self.clock
    }
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }
    pub fn start(&self) -> DateTime<Utc> {
        self.start
    }
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
    pub fn devices(&self) -> &[SimDevice] {
        &self.devices
    }
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// Fault settings, changeable between runs (e.g. heal the network).
    pub fn faults_mut(&mut self) -> &mut Faults {
        &mut self.opts.faults
    }
    /// Restarts the gateway at `at` (simulated time).
    pub fn schedule_restart(&mut self, at: DateTime<Utc>, kind: RestartKind) {
        self.push(at, Ev::Restart(kind));
    }
    /// When the next queued event happens.
    pub fn next_event_at(&self) -> Option<DateTime<Utc>> {
        self.queue
            .peek()
            .and_then(|Reverse((ms, _))| Utc.timestamp_millis_opt(*ms).single())
    }
    /// Messages that reached a gateway that was down.
    pub fn dropped_while_down(&self) -> u64 {
        self.dropped_while_down
    }

    pub(crate) fn push(&mut self, at: DateTime<Utc>, ev: Ev) {
        if matches!(ev, Ev::ToGateway(..) | Ev::ToDevice(..)) {
            self.in_flight += 1;
        }
        self.seq += 1;
        self.queue.push(Reverse((at.timestamp_millis(), self.seq)));
        self.events.insert(self.seq, ev);
    }

    pub(crate) fn apply(&mut self, i: usize, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Publish { at, topic, payload } => {
                    self.push(at + self.latency, Ev::ToGateway(topic, payload))
                }
                Action::Timer { at, token } => self.push(at, Ev::Timer(i, token)),
                Action::Sleep { until } => self.push(until, Ev::Wake(i)),
            }
        }
    }

    pub(crate) fn route(&mut self, out: Vec<Publish>, now: DateTime<Utc>) {
        for p in out {
            let Ok(t) = protocol::parse_topic(&p.topic) else {
                continue;
            };
            if let Some(&i) = self.by_wire.get(t.wire_id) {
                let session = self.devices[i].session();
                self.push(now + self.latency, Ev::ToDevice(i, session, p.payload));
            }
        }
    }

    pub(crate) fn commit(&mut self, now: DateTime<Utc>) -> Result<(), SimError> {
        if let Some(e) = self.engine.as_mut() {
            let out = e.commit(now)?;
            self.route(out, now);
        }
        Ok(())
    }

    pub(crate) fn observe(&mut self) {
        self.max_streaming = self
            .max_streaming
            .max(self.metrics.streaming.load(Ordering::Relaxed));
    }

    pub(crate) fn busy(&self) -> bool {
        self.in_flight > 0 || self.devices.iter().any(SimDevice::is_awake)
    }

    /// Runs every event up to and including `until`.
    pub fn run_until(&mut self, until: DateTime<Utc>) -> Result<(), SimError> {
        while let Some(Reverse((ms, seq))) = self.queue.peek().copied() {
            if ms > until.timestamp_millis() {
                break;
            }
            self.queue.pop();
            let Some(ev) = self.events.remove(&seq) else {
                continue;
            };
            let now = Utc
                .timestamp_millis_opt(ms)
                .single()
                .unwrap_or_else(|| self.clock.now());
            self.clock.set(now);
            self.step(ev, now)?;
            if let Some(every) = self.progress_every {
                if now >= self.next_progress {
                    eprintln!(
                        "[{}] {}",
                        now.format("%Y-%m-%d %H:%M"),
                        self.progress_line()
                    );
                    self.next_progress = now + every;
                }
            }
        }
        self.clock.set(until.max(self.clock.now()));
        Ok(())
    }

    /// Runs for `d` of simulated time from now.
    pub fn run_for(&mut self, d: Duration) -> Result<Summary, SimError> {
        let until = self.clock.now() + d;
        self.run_until(until)?;
        Ok(self.summary())
    }

    pub(crate) fn step(&mut self, ev: Ev, now: DateTime<Utc>) -> Result<(), SimError> {
        let faults = self.opts.faults.clone();
        match ev {
            Ev::Wake(i) => {
                let a = self.devices[i].wake(now, &faults)?;
                self.apply(i, a);
                if !self.tick_scheduled {
                    self.tick_scheduled = true;
                    self.push(now, Ev::Tick);
                }
            }
            Ev::Timer(i, token) => {
                let a = self.devices[i].on_timer(now, token)?;
                self.apply(i, a);
            }
            Ev::Disconnect(i, session) => {
                if self.devices[i].session() == session {
                    let a = self.devices[i].on_disconnect(now)?;
                    self.apply(i, a);
                }
            }
            Ev::ToDevice(i, session, payload) => {
                self.in_flight -= 1;
                if self.devices[i].session() == session {
                    let a = self.devices[i].on_message(now, &payload, &faults)?;
                    self.apply(i, a);
                }
            }
            Ev::ToGateway(topic, payload) => {
                self.in_flight -= 1;
                match self.engine.as_mut() {
                    None => self.dropped_while_down += 1,
                    Some(e) => {
                        e.handle(&topic, &payload, now);
                        let wants = e.wants_commit();
                        self.observe();
                        if wants {
                            self.commit(now)?;
                        }
                    }
                }
            }
            Ev::Tick => {
                if let Some(e) = self.engine.as_mut() {
                    e.tick(now);
                    self.observe();
                }
                self.commit(now)?;
                if self.busy() {
                    self.push(now + Duration::milliseconds(50), Ev::Tick);
                } else {
                    self.tick_scheduled = false;
                }
            }
            Ev::Restart(kind) => {
                if let Some(mut e) = self.engine.take() {
                    self.restarts += 1;
                    warn!(?kind, "simulated gateway restart");
                    if kind == RestartKind::Graceful {
                        // As `serve` shuts down: everything to disk.
                        let out = e.flush(now)?;
                        self.route(out, now);
                    }
                    drop(e);
                    self.metrics.streaming.store(0, Ordering::Relaxed);
                    self.metrics.waiting.store(0, Ordering::Relaxed);
                    // The broker goes with it: every connected device drops.
                    let after = if kind == RestartKind::Graceful {
                        self.latency * 2
                    } else {
                        Duration::zero()
                    };
                    for i in 0..self.devices.len() {
                        if self.devices[i].is_awake() {
                            let s = self.devices[i].session();
                            self.push(now + after, Ev::Disconnect(i, s));
                        }
                    }
                    self.push(now + self.restart_downtime, Ev::GatewayUp);
                }
            }
            Ev::GatewayUp => {
                self.engine = Some(Self::engine(&self.cfg, &self.store, &self.metrics)?);
                info!("simulated gateway back up");
            }
        }
        Ok(())
    }

    pub(crate) fn progress_line(&self) -> String {
        let s = self.summary();
        format!(
            "awake {:>4}  captured {:>6}  delivered {:>6}  pending {:>5}  retries {:>5}  streaming {}",
            self.devices.iter().filter(|d| d.is_awake()).count(),
            s.totals.captured,
            s.totals.delivered,
            s.pending,
            s.totals.retry_rounds,
            self.metrics.streaming.load(Ordering::Relaxed)
        )
    }

    pub fn summary(&self) -> Summary {
        let mut s = Summary::default();
        for d in &self.devices {
            s.add(&d.stats, d.pending());
        }
        s.gateway_restarts = self.restarts;
        s.max_streaming = self.max_streaming;
        s.simulated = self.clock.now() - self.start;
        s
    }
}

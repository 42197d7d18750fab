use super::Ack;
use slab::Slab;
use tracing::{info, trace};

use crate::protocol::{
    matches, ConnAck, ConnAckProperties, PingResp, PubAck, PubComp, PubRec, PubRel, Publish,
    PublishProperties, SubAck, UnsubAck,
};
use crate::router::{DataRequest, FilterIdx, SubscriptionMeter, Waiters};
use crate::{ConnectionId, Filter, Offset, RouterConfig, Topic};

use crate::segments::{CommitLog, Position};
use crate::Storage;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::time::Instant;

type PubWithProp = (Publish, Option<PublishProperties>);

#[derive(Clone)]
pub struct PublishData {
    pub publish: Publish,
    pub properties: Option<PublishProperties>,
    pub timestamp: Instant,
}

impl From<PubWithProp> for PublishData {
    fn from((publish, properties): PubWithProp) -> Self {
        PublishData {
            publish,
            properties,
            timestamp: Instant::now(),
        }
    }
}

// TODO: remove this from here
impl Storage for PublishData {
    // TODO: calculate size of publish properties as well!
    fn size(&self) -> usize {
        let publish = &self.publish;
        4 + publish.topic.len() + publish.payload.len()
    }
}

/// Stores 'device' data and 'actions' data in native commitlog
/// organized by subscription filter. Device data is replicated
/// while actions data is not
pub struct DataLog {
    pub config: RouterConfig,
    /// Native commitlog data organized by subscription. Contains
    /// device data and actions data logs.
    ///
    /// Device data is replicated while actions data is not.
    /// Also has waiters used to wake connections/replicator tracker
    /// which are caught up with all the data on 'Filter' and waiting
    /// for new data
    pub native: Slab<Data<PublishData>>,
    /// Map of subscription filter name to filter index
    filter_indexes: HashMap<Filter, FilterIdx>,
    retained_publishes: HashMap<Topic, PublishData>,
    /// List of filters associated with a topic
    publish_filters: HashMap<Topic, Vec<FilterIdx>>,
    /// barngate patch: the filters with a `+` or `#`, so that a new topic is
    /// matched against these only (wildcard-free ones by a map lookup).
    wildcard_filters: Vec<(Filter, FilterIdx)>,
    /// barngate patch: the filters each connection has been parked on, so
    /// that a disconnect visits those instead of every filter ever created
    /// (two per device that ever connected: O(devices) per disconnect).
    parked_on: HashMap<ConnectionId, HashSet<FilterIdx>>,
}

fn has_wildcard(filter: &str) -> bool {
    filter.bytes().any(|b| b == b'+' || b == b'#')
}

impl DataLog {
    pub fn new(config: RouterConfig) -> io::Result<DataLog> {
        let mut native = Slab::new();
        let mut filter_indexes = HashMap::new();
        let retained_publishes = HashMap::new();
        let publish_filters = HashMap::new();
        let mut wildcard_filters = Vec::new();

        if let Some(warmup_filters) = config.initialized_filters.clone() {
            for filter in warmup_filters {
                let data = Data::new(&filter, &config);

                // Add commitlog to datalog and add datalog index to filter to
                // datalog index map
                let idx = native.insert(data);
                if has_wildcard(&filter) {
                    wildcard_filters.push((filter.clone(), idx));
                }
                filter_indexes.insert(filter, idx);
            }
        }

        Ok(DataLog {
            config,
            native,
            publish_filters,
            filter_indexes,
            retained_publishes,
            wildcard_filters,
            parked_on: HashMap::new(),
        })
    }

    pub fn meter(&mut self, filter: &str) -> Option<&mut SubscriptionMeter> {
        let data = self.native.get_mut(*self.filter_indexes.get(filter)?)?;
        Some(&mut data.meter)
    }

    pub fn waiters(&self, filter: &Filter) -> Option<&Waiters<DataRequest>> {
        self.native
            .get(*self.filter_indexes.get(filter)?)
            .map(|data| &data.waiters)
    }

    pub fn remove_waiters_for_id(
        &mut self,
        id: ConnectionId,
        filter: &Filter,
    ) -> Option<DataRequest> {
        let data = self
            .native
            .get_mut(*self.filter_indexes.get(filter)?)
            .unwrap();
        let waiters = data.waiters.get_mut();

        waiters
            .iter()
            .position(|&(conn_id, _)| conn_id == id)
            .and_then(|index| {
                waiters
                    .swap_remove_back(index)
                    .map(|(_, data_req)| data_req)
            })
    }

    // TODO: Currently returning a Option<Vec> instead of Option<&Vec> due to Rust borrow checker
    // limitation
    pub fn matches(&mut self, topic: &str) -> Option<Vec<usize>> {
        match &self.publish_filters.get(topic) {
            Some(v) => Some(v.to_vec()),
            None => {
                // barngate patch: a wildcard-free filter matches only the
                // identical topic (a map lookup); only wildcard filters are
                // scanned. Upstream scanned every filter (two per connected
                // device) with `matches` on each topic's first publish:
                // O(devices²) CPU when a thousand devices wake after a start.
                let mut v: Vec<usize> = self
                    .wildcard_filters
                    .iter()
                    .filter(|(filter, _)| matches(topic, filter))
                    .map(|(_, filter_idx)| *filter_idx)
                    .collect();
                if !topic.starts_with('$') {
                    if let Some(idx) = self.filter_indexes.get(topic) {
                        v.push(*idx);
                    }
                }

                if !v.is_empty() {
                    self.publish_filters.insert(topic.to_owned(), v.clone());
                }

                Some(v)
            }
        }
    }

    /// barngate patch: forgets a filter no session is subscribed to, with
    /// its log. Only a wildcard-free filter outside `$`: it matches one
    /// topic, its own name, so one `publish_filters` entry holds its index
    /// (which the slab may give to another filter next).
    pub fn remove_filter(&mut self, filter: &str) {
        if has_wildcard(filter) || filter.starts_with('$') {
            return;
        }
        let Some(idx) = self.filter_indexes.remove(filter) else {
            return;
        };
        if let Some(filters) = self.publish_filters.get_mut(filter) {
            filters.retain(|i| *i != idx);
            if filters.is_empty() {
                self.publish_filters.remove(filter);
            }
        }
        self.native.remove(idx);
    }

    pub fn next_native_offset(&mut self, filter: &str) -> (FilterIdx, Offset) {
        let publish_filters = &mut self.publish_filters;
        let filter_indexes = &mut self.filter_indexes;

        let (filter_idx, data) = match filter_indexes.get(filter) {
            Some(idx) => (*idx, self.native.get(*idx).unwrap()),
            None => {
                let data = Data::new(filter, &self.config);

                // Add commitlog to datalog and add datalog index to filter to
                // datalog index map
                let idx = self.native.insert(data);
                if has_wildcard(filter) {
                    self.wildcard_filters.push((filter.to_owned(), idx));
                }
                self.filter_indexes.insert(filter.to_owned(), idx);

                // Match new filter to existing topics and add to publish_filters if it matches
                // barngate patch: a wildcard-free filter matches one topic,
                // its own name (a map lookup); only a wildcard filter is
                // matched against every topic seen. Upstream scanned every
                // topic for each new filter: with two filters and a reply
                // topic per device, O(devices²) when a thousand wake.
                if has_wildcard(filter) {
                    for (topic, filters) in publish_filters.iter_mut() {
                        if matches(topic, filter) {
                            filters.push(idx);
                        }
                    }
                } else if filter.starts_with('$') {
                    // `matches` matches no `$` topic.
                } else if let Some(filters) = publish_filters.get_mut(filter) {
                    filters.push(idx);
                }

                (idx, self.native.get(idx).unwrap())
            }
        };

        (filter_idx, data.log.next_offset())
    }

    pub fn native_readv(
        &self,
        filter_idx: FilterIdx,
        offset: Offset,
        len: u64,
    ) -> io::Result<(Position, Vec<(PubWithProp, Offset)>)> {
        // unwrap to get index of `self.native` is fine here, because when a new subscribe packet
        // arrives in `Router::handle_device_payload`, it first calls the function
        // `next_native_offset` which creates a new commitlog if one doesn't exist. So any new
        // reads will definitely happen on a valid filter.
        let data = self.native.get(filter_idx).unwrap();
        let mut o = Vec::new();
        // TODO: `readv` is infallible but its current return type does not
        // reflect that. Consequently, this method is also infallible.
        // Encoding this information is important so that calling function
        // has more information on how this method behaves.
        let next = data.log.readv(offset, len, &mut o)?;

        let now = Instant::now();
        o.retain_mut(|(pubdata, _)| {
            // Keep data if no properties exists, which implies no message expiry!
            let Some(properties) = pubdata.properties.as_mut() else {
                return true;
            };

            // Keep data if there is no message_expiry_interval
            let Some(message_expiry_interval) = properties.message_expiry_interval.as_mut() else {
                return true;
            };

            let time_spent = (now - pubdata.timestamp).as_secs() as u32;

            let is_valid = time_spent < *message_expiry_interval;

            // ignore expired messages
            if is_valid {
                // set message_expiry_interval to (original value - time spent waiting in server)
                // ref: https://docs.oasis-open.org/mqtt/mqtt/v5.0/os/mqtt-v5.0-os.html#_Toc3901112
                *message_expiry_interval -= time_spent;
            }

            is_valid
        });

        // no need to include timestamp when returning
        let o = o
            .into_iter()
            .map(|(pubdata, offset)| ((pubdata.publish, pubdata.properties), offset))
            .collect();

        Ok((next, o))
    }

    pub fn shadow(&mut self, filter: &str) -> Option<PubWithProp> {
        let data = self.native.get_mut(*self.filter_indexes.get(filter)?)?;
        data.log.last().map(|p| (p.publish, p.properties))
    }

    /// This method is called when the subscriber has caught up with the commit log. In which case,
    /// instead of actively checking for commits in each `Router::run_inner` iteration, we instead
    /// wait and only try reading again when new messages have been added to the commit log. This
    /// methods converts a `DataRequest` (which actively reads the commit log in `Router::consume`)
    /// to a `Waiter` (which only reads when notified).
    pub fn park(&mut self, id: ConnectionId, request: DataRequest) {
        // calling unwrap on index here is fine, because only place this function is called is in
        // `Router::consume` method, when the status after reading from commit log of the same
        // filter as `request` is "done", that is, the subscriber has caught up. In other words,
        // there has been atleast 1 call to `native_readv` for the same filter, which means if
        // `native_readv` hasn't paniced, so this won't panic either.
        let filter_idx = request.filter_idx;
        let data = self.native.get_mut(filter_idx).unwrap();
        data.waiters.register(id, request);
        self.parked_on.entry(id).or_default().insert(filter_idx);
    }

    /// Cleanup a connection from all the waiters
    pub fn clean(&mut self, id: ConnectionId) -> Vec<DataRequest> {
        let mut inflight = Vec::new();
        // barngate patch: only the filters this connection was parked on (a
        // superset of where it waits now; waiters taken by a notification
        // leave their filter in the set, which costs only a lookup).
        for filter_idx in self.parked_on.remove(&id).unwrap_or_default() {
            if let Some(data) = self.native.get_mut(filter_idx) {
                inflight.append(&mut data.waiters.remove(id));
            }
        }

        inflight
    }

    pub fn insert_to_retained_publishes(
        &mut self,
        publish: Publish,
        publish_properties: Option<PublishProperties>,
        topic: Topic,
    ) {
        let pub_with_props = (publish, publish_properties);
        self.retained_publishes.insert(topic, pub_with_props.into());
    }

    pub fn remove_from_retained_publishes(&mut self, topic: Topic) {
        self.retained_publishes.remove(&topic);
    }

    pub fn read_retained_messages(&mut self, filter: &str) -> Vec<PubWithProp> {
        trace!(info = "reading retain msg", filter = &filter);
        let now = Instant::now();

        // discard expired retained messages
        self.retained_publishes.retain(|_, pubdata| {
            // Keep data if no properties exists, which implies no message expiry!
            let Some(properties) = pubdata.properties.as_mut() else {
                return true;
            };

            // Keep data if there is no message_expiry_interval
            let Some(message_expiry_interval) = properties.message_expiry_interval.as_mut() else {
                return true;
            };

            let time_spent = (now - pubdata.timestamp).as_secs() as u32;

            let is_valid = time_spent < *message_expiry_interval;

            // ignore expired messages
            if is_valid {
                // set message_expiry_interval to (original value - time spent waiting in server)
                // ref: https://docs.oasis-open.org/mqtt/mqtt/v5.0/os/mqtt-v5.0-os.html#_Toc3901112
                *message_expiry_interval -= time_spent;
            }

            is_valid
        });

        // no need to include timestamp when returning
        self.retained_publishes
            .iter()
            .filter(|(topic, _)| matches(topic, filter))
            .map(|(_, p)| (p.publish.clone(), p.properties.clone()))
            .collect()
    }
}

pub struct Data<T> {
    filter: Filter,
    pub log: CommitLog<T>,
    pub waiters: Waiters<DataRequest>,
    meter: SubscriptionMeter,
}

impl<T> Data<T>
where
    T: Storage + Clone,
{
    pub fn new(filter: &str, router_config: &RouterConfig) -> Data<T> {
        let mut max_segment_size = router_config.max_segment_size;
        let mut max_mem_segments = router_config.max_segment_count;

        // Override segment config for selected filter
        if let Some(config) = &router_config.custom_segment {
            for (f, segment_config) in config {
                if matches(filter, f) {
                    info!("Overriding segment config for filter: {}", filter);
                    max_segment_size = segment_config.max_segment_size;
                    max_mem_segments = segment_config.max_segment_count;
                }
            }
        }

        // max_segment_size: usize, max_mem_segments: usize
        let log = CommitLog::new(max_segment_size, max_mem_segments).unwrap();

        // barngate patch: grows on demand (was room for 10 requests, ~1 KB
        // for each of a device's filters).
        let waiters = Waiters::with_capacity(0);
        let metrics = SubscriptionMeter::default();
        Data {
            filter: filter.to_owned(),
            log,
            waiters,
            meter: metrics,
        }
    }

    /// Writes to all the filters that are mapped to this publish topic
    /// and wakes up consumers that are matching this topic (if they exist)
    pub fn append(
        &mut self,
        item: T,
        notifications: &mut VecDeque<(ConnectionId, DataRequest)>,
    ) -> (Offset, &Filter) {
        let size = item.size();
        let offset = self.log.append(item);
        if let Some(mut parked) = self.waiters.take() {
            notifications.append(&mut parked);
        }

        self.meter.count += 1;
        self.meter.total_size += size;

        (offset, &self.filter)
    }
}

/// Acks log for a subscription
#[derive(Debug)]
pub struct AckLog {
    // Committed acks per connection. First pkid, last pkid, data
    committed: VecDeque<Ack>,
    // Recorded qos 2 publishes
    // barngate patch: keyed by packet id (was a queue whose front any
    // PUBREL released), so that a PUBREL releases the message with its
    // packet id and a resend before the PUBREL is not recorded twice
    // (MQTT-4.3.3-2).
    recorded: HashMap<u16, (Publish, Option<PublishProperties>)>,
}

impl AckLog {
    /// New log
    pub fn new() -> AckLog {
        AckLog {
            // barngate patch: grow on demand (was with_capacity(100) each).
            committed: VecDeque::new(),
            recorded: HashMap::new(),
        }
    }

    pub fn connack(&mut self, id: ConnectionId, ack: ConnAck, props: Option<ConnAckProperties>) {
        let ack = Ack::ConnAck(id, ack, props);
        self.committed.push_back(ack);
    }

    pub fn suback(&mut self, ack: SubAck) {
        let ack = Ack::SubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn puback(&mut self, ack: PubAck) {
        let ack = Ack::PubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn pubrec(&mut self, publish: Publish, props: Option<PublishProperties>, ack: PubRec) {
        // barngate patch: a resend of a publish not yet released (same
        // packet id, DUP set) is answered again but not recorded again: it
        // must not be delivered twice (MQTT-4.3.3-2). The first copy is kept.
        self.recorded.entry(ack.pkid).or_insert((publish, props));
        let ack = Ack::PubRec(ack);
        self.committed.push_back(ack);
    }

    pub fn pubrel(&mut self, ack: PubRel) {
        let ack = Ack::PubRel(ack);
        self.committed.push_back(ack);
    }

    pub fn pubcomp(&mut self, ack: PubComp) -> Option<(Publish, Option<PublishProperties>)> {
        // barngate patch: release the publish with this packet id (was the
        // oldest one recorded, whatever its id).
        let publish = self.recorded.remove(&ack.pkid);
        let ack = Ack::PubComp(ack);
        self.committed.push_back(ack);
        publish
    }

    /// barngate patch: the QoS 2 publishes received and not yet released,
    /// which a persistent session keeps across a reconnect (MQTT 3.1.1
    /// §3.1.2.4).
    pub fn take_recorded(&mut self) -> HashMap<u16, (Publish, Option<PublishProperties>)> {
        std::mem::take(&mut self.recorded)
    }

    /// barngate patch: restores what [`AckLog::take_recorded`] took.
    pub fn restore_recorded(
        &mut self,
        recorded: HashMap<u16, (Publish, Option<PublishProperties>)>,
    ) {
        self.recorded = recorded;
    }

    pub fn pingresp(&mut self, ack: PingResp) {
        let ack = Ack::PingResp(ack);
        self.committed.push_back(ack);
    }

    pub fn unsuback(&mut self, ack: UnsubAck) {
        let ack = Ack::UnsubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn readv(&mut self) -> &mut VecDeque<Ack> {
        &mut self.committed
    }
}

#[cfg(test)]
mod test {
    use super::{AckLog, DataLog};
    use crate::protocol::{PubComp, PubCompReason, PubRec, PubRecReason, Publish, QoS};
    use crate::router::shared_subs::Strategy;
    use crate::RouterConfig;

    // barngate patch: QoS 2 publishes are released by their own PUBREL,
    // once (MQTT-4.3.3-2).
    #[test]
    fn qos2_publishes_are_released_once_by_their_own_packet_id() {
        let publish = |pkid: u16, payload: &'static str| {
            let mut p = Publish::new("t", payload, false);
            p.qos = QoS::ExactlyOnce;
            p.pkid = pkid;
            p
        };
        let pubrec = |pkid| PubRec {
            pkid,
            reason: PubRecReason::Success,
        };
        let pubcomp = |pkid| PubComp {
            pkid,
            reason: PubCompReason::Success,
        };
        let mut log = AckLog::new();
        log.pubrec(publish(1, "a"), None, pubrec(1));
        log.pubrec(publish(2, "b"), None, pubrec(2));
        let mut resent = publish(1, "a");
        resent.dup = true;
        log.pubrec(resent, None, pubrec(1));
        assert_eq!(log.readv().drain(..).count(), 3, "a PUBREC for each");

        let released = |log: &mut AckLog, pkid| log.pubcomp(pubcomp(pkid)).map(|(p, _)| p.payload);
        assert_eq!(released(&mut log, 2).as_deref(), Some(&b"b"[..]));
        assert_eq!(released(&mut log, 1).as_deref(), Some(&b"a"[..]));
        assert_eq!(released(&mut log, 1), None, "released once");
        assert_eq!(
            log.readv().drain(..).count(),
            3,
            "a PUBCOMP for each PUBREL"
        );
    }

    #[test]
    fn publish_filters_updating_correctly_on_new_topic_subscription() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        };
        let mut data = DataLog::new(config).unwrap();
        data.next_native_offset("topic/a");
        data.matches("topic/a");

        data.next_native_offset("topic/+");

        assert_eq!(data.publish_filters.get("topic/a").unwrap().len(), 2);
    }

    #[test]
    fn publish_filters_updating_correctly_on_new_publish() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        };
        let mut data = DataLog::new(config).unwrap();
        data.next_native_offset("+/+");

        data.matches("topic/a");

        assert_eq!(data.publish_filters.get("topic/a").unwrap().len(), 1);
    }

    /// barngate patch: a forgotten filter's slab index, given to the next
    /// new filter, carries only that filter's topic; a re-created filter
    /// gets its topic back; wildcard filters are kept.
    #[test]
    fn a_removed_filters_index_carries_no_old_topic() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        };
        let mut data = DataLog::new(config).unwrap();
        let (wild, _) = data.next_native_offset("dev/+/cmd");
        let (a, _) = data.next_native_offset("dev/a/cmd");
        assert_eq!(data.matches("dev/a/cmd"), Some(vec![wild, a]));
        data.remove_filter("dev/a/cmd");
        data.remove_filter("dev/+/cmd");
        assert_eq!(data.matches("dev/a/cmd"), Some(vec![wild]), "only the wildcard");
        let (b, _) = data.next_native_offset("dev/b/cmd");
        assert_eq!(b, a, "the slab gives the index to the next filter");
        assert_eq!(data.matches("dev/a/cmd"), Some(vec![wild]));
        assert_eq!(data.matches("dev/b/cmd"), Some(vec![wild, b]));
        let (a2, _) = data.next_native_offset("dev/a/cmd");
        assert_eq!(data.matches("dev/a/cmd"), Some(vec![wild, a2]));
        // An exact `$` filter is matched by no topic, as upstream.
        data.matches("$SYS/x");
        data.next_native_offset("$SYS/x");
        assert_eq!(data.matches("$SYS/x"), Some(vec![]));
    }

    //     #[test]
    //     fn appends_are_written_to_correct_commitlog() {
    //         pretty_env_logger::init();
    //         let config = RouterConfig {
    //             instant_ack: true,
    //             max_segment_size: 1024,
    //             max_connections: 10,
    //             max_mem_segments: 10,
    //             max_disk_segments: 0,
    //             max_read_len: 1024,
    //             log_dir: None,
    //             dynamic_log: true,
    //         };

    //         let mut data = DataLog::new(config).unwrap();
    //         data.next_native_offset("/devices/2321/actions");
    //         for i in 0..2 {
    //             let publish = Publish::new("/devices/2321/events/imu/jsonarray", QoS::AtLeastOnce, vec![1, 2, 3]);
    //             let v = data.native_append(publish);
    //             dbg!(v);
    //         }

    //         for i in 0..2 {
    //             let publish = Publish::new("/devices/2321/actions", QoS::AtLeastOnce, vec![1, 2, 3]);
    //             let v = data.native_append(publish);
    //             dbg!(v);
    //         }
    //     }
}

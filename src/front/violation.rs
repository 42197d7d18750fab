//! Why the front closes a connection: the metric reason, the log's class
//! and text, and the CONNACK return code that refuses a CONNECT.

/// MQTT 3.1.1 CONNACK return codes.
pub(super) const CONNACK_UNSUPPORTED_PROTOCOL: u8 = 1;
pub(super) const CONNACK_IDENTIFIER_REJECTED: u8 = 2;
pub(super) const CONNACK_SERVER_UNAVAILABLE: u8 = 3;
pub(super) const CONNACK_BAD_CREDENTIALS: u8 = 4;
pub(super) const CONNACK_NOT_AUTHORIZED: u8 = 5;

/// Why a connection was closed by the front (also the metric reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Violation {
    NotConnect,
    ClientIdMismatch {
        client_id: String,
    },
    BadClientId {
        client_id: String,
    },
    Publish {
        topic: String,
    },
    Subscribe {
        filter: String,
    },
    /// A CONNECT whose will is on a topic the device may not publish to.
    Will {
        topic: String,
    },
    /// A CONNECT of another MQTT version (3.1's `MQIsdp`, 5, or unknown).
    UnsupportedProtocol {
        level: u8,
    },
    SecondConnect,
    ServerPacket,
    Malformed(String),
    /// Nothing from the device within 1.5 × its keep-alive.
    KeepAlive {
        secs: u16,
    },
    /// A SUBSCRIBE with more filters than one may carry, or one that takes
    /// the session past its distinct filters.
    TooManyFilters {
        count: usize,
        max: usize,
        per: &'static str,
    },
    /// The broker did not acknowledge the CONNECT or a SUBSCRIBE in time.
    BrokerTimeout,
    /// Not a violation: the connection broke.
    Io(String),
}

impl Violation {
    pub(super) fn reason(&self) -> &'static str {
        match self {
            Violation::NotConnect | Violation::SecondConnect | Violation::ServerPacket => {
                "mqtt_protocol_violation"
            }
            Violation::ClientIdMismatch { .. } => "client_id_mismatch",
            Violation::BadClientId { .. } => "bad_client_id",
            Violation::Publish { .. } => "publish_not_allowed",
            Violation::Subscribe { .. } => "subscribe_not_allowed",
            Violation::Will { .. } => "will_not_allowed",
            Violation::UnsupportedProtocol { .. } => "unsupported_protocol",
            Violation::Malformed(_) => "malformed_mqtt",
            Violation::KeepAlive { .. } => "keepalive_timeout",
            Violation::TooManyFilters { .. } => "too_many_filters",
            Violation::BrokerTimeout => "broker_timeout",
            Violation::Io(_) => "connection_error",
        }
    }

    /// The CONNACK return code that refuses a CONNECT for this reason
    /// (MQTT 3.1.1 §3.2.2.3); `None` where the connection is just closed
    /// (a packet that is not a CONNECT, or not MQTT at all).
    pub(super) fn connack_code(&self) -> Option<u8> {
        match self {
            Violation::UnsupportedProtocol { .. } => Some(CONNACK_UNSUPPORTED_PROTOCOL),
            Violation::ClientIdMismatch { .. } | Violation::BadClientId { .. } => {
                Some(CONNACK_IDENTIFIER_REJECTED)
            }
            Violation::Will { .. } => Some(CONNACK_NOT_AUTHORIZED),
            _ => None,
        }
    }

    /// What kind of close this is, for the log: only a device claiming or
    /// reaching for another identity's client id or topics is an identity
    /// violation (counted in `barngate_identity_violations_total`).
    pub(super) fn class(&self) -> &'static str {
        match self {
            Violation::ClientIdMismatch { .. }
            | Violation::BadClientId { .. }
            | Violation::Publish { .. }
            | Violation::Subscribe { .. }
            | Violation::Will { .. } => "identity violation",
            Violation::KeepAlive { .. } => "keep-alive expired",
            Violation::TooManyFilters { .. } => "limit exceeded",
            Violation::BrokerTimeout => "broker timeout",
            Violation::UnsupportedProtocol { .. } => "unsupported protocol",
            Violation::NotConnect
            | Violation::SecondConnect
            | Violation::ServerPacket
            | Violation::Malformed(_) => "MQTT protocol error",
            Violation::Io(_) => "connection error",
        }
    }

    pub(super) fn is_identity(&self) -> bool {
        self.class() == "identity violation"
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::NotConnect => write!(f, "first packet is not CONNECT"),
            Violation::ClientIdMismatch { client_id } => {
                write!(
                    f,
                    "CONNECT client id {client_id:?} is not the authenticated MAC"
                )
            }
            Violation::BadClientId { client_id } => {
                write!(f, "CONNECT client id {client_id:?} is not a device id")
            }
            Violation::Publish { topic } => write!(f, "publish to {topic:?} not allowed"),
            Violation::Subscribe { filter } => write!(f, "subscribe to {filter:?} not allowed"),
            Violation::Will { topic } => write!(f, "will on {topic:?} not allowed"),
            Violation::UnsupportedProtocol { level } => {
                write!(
                    f,
                    "CONNECT of protocol level {level}; only 4 (MQTT 3.1.1) is served"
                )
            }
            Violation::SecondConnect => write!(f, "second CONNECT"),
            Violation::ServerPacket => write!(f, "server-only packet from a device"),
            Violation::Malformed(e) => write!(f, "malformed MQTT: {e}"),
            Violation::KeepAlive { secs } => {
                write!(f, "no packet within 1.5 × the keep-alive of {secs} s")
            }
            Violation::TooManyFilters { count, max, per } => {
                write!(
                    f,
                    "{count} topic filters in one {per}, at most {max} allowed"
                )
            }
            Violation::BrokerTimeout => {
                write!(
                    f,
                    "the embedded broker did not acknowledge the session in time"
                )
            }
            Violation::Io(e) => write!(f, "{e}"),
        }
    }
}

pub(super) fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

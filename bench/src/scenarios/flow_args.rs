//! The fanout and latency scenarios' own defaults, turned into throughput options.

use super::throughput::FlowArgs;

/// `fanout`: one publisher, many subscribers.
#[derive(Debug, Clone, clap::Args)]
pub struct FanoutArgs {
    #[arg(long, default_value_t = 20)]
    pub subscribers: usize,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// Offered rate in messages/s; omitted: unbounded.
    #[arg(long)]
    pub rate: Option<f64>,
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    #[arg(long, default_value_t = 300)]
    pub payload: usize,
    #[arg(long, default_value_t = 100)]
    pub inflight: usize,
    /// Subscribers with persistent sessions (clean session 0): their QoS 1 messages are
    /// durable before the publisher's PUBACK (on our broker).
    #[arg(long)]
    pub persistent: bool,
}

/// `latency`: one publisher, one subscriber, a steady rate.
#[derive(Debug, Clone, clap::Args)]
pub struct LatencyArgs {
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    #[arg(long, default_value_t = 300)]
    pub payload: usize,
}

fn base() -> FlowArgs {
    FlowArgs {
        publishers: 1,
        subscribers: 1,
        qos: 1,
        rate: None,
        duration: 5.0,
        payload: 300,
        inflight: 100,
        sweep: false,
        step_secs: 3.0,
        start_rate: 2000.0,
        max_p99_ms: 50.0,
        persistent: false,
    }
}

impl From<&FanoutArgs> for FlowArgs {
    fn from(a: &FanoutArgs) -> Self {
        FlowArgs {
            subscribers: a.subscribers,
            qos: a.qos,
            rate: a.rate,
            duration: a.duration,
            payload: a.payload,
            inflight: a.inflight,
            persistent: a.persistent,
            ..base()
        }
    }
}

impl From<&LatencyArgs> for FlowArgs {
    fn from(a: &LatencyArgs) -> Self {
        FlowArgs {
            qos: a.qos,
            rate: Some(a.rate),
            duration: a.duration,
            payload: a.payload,
            ..base()
        }
    }
}

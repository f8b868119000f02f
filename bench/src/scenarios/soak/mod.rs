//! `soak`: tens of clients cycling for `--minutes` against one broker, which is killed with
//! SIGKILL halfway and restarted on the same data. Paced publishers at QoS 0, 1 and 2;
//! persistent subscribers that leave, come back and take over their own sessions; clients
//! whose wills must fire (or, after a DISCONNECT, must not); short-lived subscribers and
//! pairs of connections sharing a client id. It asserts, and the process exits non-zero
//! otherwise (`"pass": false`): every QoS 1 and 2 message the broker acknowledged reached
//! every persistent subscriber, every will behaved, every takeover closed the first
//! connection, and the broker's RSS and descriptors grew by at most `--max-growth` from the
//! level after the post-restart warm-up to the end (see [`verdict::windows`]).

mod ctx;
mod v5;
mod verdict;
mod workers;

use super::{mb, round, Common, Outcome, Setup};
use crate::target::{Broker, Kind};
use ctx::Ctx;
use rumqttc::mqttbytes::QoS;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use verdict::Sample;
use workers::{Expected, PubOutcome, PubSpec, SubOutcome, SubSpec, WillOutcome};

#[derive(Debug, Clone, clap::Args)]
pub struct SoakArgs {
    /// Length of the load, SIGKILL included (the final drain comes after).
    #[arg(long, default_value_t = 30.0)]
    pub minutes: f64,
    /// Publishers per QoS level (0, 1 and 2), each on its own topic.
    #[arg(long, default_value_t = 2)]
    pub publishers_per_qos: u32,
    /// Messages/s of each publisher.
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Persistent subscribers (MQTT 3.1.1, clean session 0) to every publisher's topic
    /// (a will watcher comes on top).
    #[arg(long, default_value_t = 4)]
    pub persistent_subscribers: u32,
    /// Persistent subscribers speaking MQTT 5 (session expiry 1 hour), the same way.
    #[arg(long, default_value_t = 1)]
    pub v5_subscribers: u32,
    #[arg(long, default_value_t = 6)]
    pub will_clients: u32,
    /// Short-lived clean-session subscribers.
    #[arg(long, default_value_t = 12)]
    pub churners: u32,
    /// Client ids connected twice at once, over and over.
    #[arg(long, default_value_t = 3)]
    pub takeover_pairs: u32,
    #[arg(long, default_value_t = 200)]
    pub payload: usize,
    /// Seconds between samples of the broker's RSS and open descriptors.
    #[arg(long, default_value_t = 5.0)]
    pub sample_secs: f64,
    /// No SIGKILL: the reference level is then taken after the warm-up from the start.
    #[arg(long)]
    pub no_kill: bool,
    /// Largest growth of RSS and descriptors allowed from the reference to the end.
    #[arg(long, default_value_t = 0.10)]
    pub max_growth: f64,
}

/// The tasks of the soak, joined in order at the end.
struct Tasks {
    subscribers: Vec<JoinHandle<SubOutcome>>,
    will_watcher: JoinHandle<SubOutcome>,
    publishers: Vec<JoinHandle<PubOutcome>>,
    will_clients: Vec<JoinHandle<WillOutcome>>,
    churners: Vec<JoinHandle<u64>>,
    pairs: Vec<JoinHandle<()>>,
}

pub async fn run(common: &Common, args: &SoakArgs) -> anyhow::Result<Outcome> {
    let total = Duration::from_secs_f64((args.minutes * 60.0).max(60.0));
    let variant = format!(
        "{} min, {}",
        round(total.as_secs_f64() / 60.0, 1),
        if args.no_kill {
            "no kill"
        } else {
            "SIGKILL halfway"
        }
    );
    let mut out = Outcome::new("soak", common.target, &variant);
    // Room for every offline period: what is measured is loss, not the queue's limit.
    let mut setup = Setup::start_queued(common, true, 100_000).await?;
    let started = Instant::now();
    let kill_at = (!args.no_kill).then(|| started + total / 2);
    let (stop_tx, stop_rx) = watch::channel(false);
    let ctx = Arc::new(Ctx::new(
        setup.broker.addr(),
        setup.publisher.clone(),
        setup.subscriber.clone(),
        kill_at,
        stop_rx,
    ));
    let (data_tx, data_rx) = watch::channel::<Option<Expected>>(None);
    let (will_tx, will_rx) = watch::channel::<Option<Expected>>(None);
    let tasks = spawn_all(&ctx, args, data_rx, will_rx).await?;

    let mut failures: Vec<String> = Vec::new();
    let mut samples: Vec<Sample> = Vec::new();
    let mut restarted_at: Option<f64> = None;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(args.sample_secs.max(1.0)));
    let mut next_progress = 60.0;
    loop {
        ticker.tick().await;
        let at = started.elapsed().as_secs_f64();
        if at >= total.as_secs_f64() {
            break;
        }
        if kill_at.is_some_and(|k| Instant::now() >= k) && restarted_at.is_none() {
            match restart(&mut setup, &ctx).await {
                Ok(ready_ms) => {
                    out.set("kill_at_s", round(at, 1));
                    out.set("restart_ready_ms", round(ready_ms, 1));
                    restarted_at = Some(started.elapsed().as_secs_f64());
                }
                Err(e) => {
                    failures.push(format!("restart after SIGKILL: {e:#}"));
                    break;
                }
            }
            continue;
        }
        if let Some(status) = setup.broker.exited() {
            failures.push(format!(
                "the broker exited on its own ({status}) at {at:.0} s"
            ));
            break;
        }
        if let Some(s) = sample(&setup.broker, &ctx, at) {
            if at >= next_progress {
                next_progress += 60.0;
                eprintln!(
                    "soak: [{:>5.1} min] rss {} MB, fds {}, client connections {}, connects {}",
                    at / 60.0,
                    mb(s.rss_kib),
                    s.fds,
                    s.live,
                    ctx.counters.connects.load(Ordering::Relaxed)
                );
            }
            samples.push(s);
        }
    }

    let _ = stop_tx.send(true);
    finish(tasks, &data_tx, &will_tx, &mut out, &mut failures).await;
    resources(&mut out, &mut failures, &samples, total, restarted_at, args);
    let c = &ctx.counters;
    let clients = args.persistent_subscribers
        + args.v5_subscribers
        + 1
        + args.publishers_per_qos * 3
        + args.will_clients
        + args.churners
        + args.takeover_pairs;
    let connects = c.connects.load(Ordering::Relaxed);
    out.set("connects", connects);
    out.set("reconnects", connects.saturating_sub(u64::from(clients)));
    out.set(
        "connect_failures",
        c.connect_failures.load(Ordering::Relaxed),
    );
    out.set("takeovers", c.takeovers.load(Ordering::Relaxed));
    let not_closed = c.takeover_old_not_closed.load(Ordering::Relaxed);
    out.set("takeover_old_not_closed", not_closed);
    if not_closed > 0 {
        failures.push(format!(
            "{not_closed} takeovers left the first connection open"
        ));
    }
    out.set("abrupt_closes", c.abrupt_closes.load(Ordering::Relaxed));
    out.set("offline_periods", c.offline_periods.load(Ordering::Relaxed));
    out.set(
        "unexpected_closes",
        c.unexpected_closes.load(Ordering::Relaxed),
    );
    out.set(
        "client_settings",
        json!({
            "publishers_per_qos": args.publishers_per_qos,
            "rate_per_publisher": args.rate,
            "persistent_subscribers": args.persistent_subscribers,
            "v5_subscribers": args.v5_subscribers,
            "will_clients": args.will_clients,
            "churners": args.churners,
            "takeover_pairs": args.takeover_pairs,
            "payload": args.payload,
        }),
    );
    out.errors(ctx.notes());
    out.set("pass", failures.is_empty());
    out.set("failures", failures);
    setup.finish(&mut out);
    Ok(out)
}

async fn spawn_all(
    ctx: &Arc<Ctx>,
    args: &SoakArgs,
    data_rx: watch::Receiver<Option<Expected>>,
    will_rx: watch::Receiver<Option<Expected>>,
) -> anyhow::Result<Tasks> {
    let seed = std::process::id() as u64 ^ crate::stats::now_ns();
    let mut ready = Vec::new();
    let mut subscribers = Vec::new();
    for j in 0..args.persistent_subscribers {
        let (tx, rx) = oneshot::channel();
        let spec = SubSpec {
            id: format!("soak-psub-{j}"),
            filter: workers::DATA_FILTER,
            churn: true,
        };
        let task = workers::persistent_subscriber(
            ctx.clone(),
            spec,
            seed + u64::from(j),
            tx,
            data_rx.clone(),
        );
        subscribers.push(tokio::spawn(task));
        ready.push(rx);
    }
    for j in 0..args.v5_subscribers {
        let (tx, rx) = oneshot::channel();
        let task = v5::persistent_subscriber(
            ctx.clone(),
            format!("soak-psub5-{j}"),
            workers::DATA_FILTER,
            seed + 50 + u64::from(j),
            tx,
            data_rx.clone(),
        );
        subscribers.push(tokio::spawn(task));
        ready.push(rx);
    }
    let (tx, rx) = oneshot::channel();
    let spec = SubSpec {
        id: "soak-willwatch".into(),
        filter: workers::WILL_FILTER,
        churn: true,
    };
    let will_watcher = tokio::spawn(workers::persistent_subscriber(
        ctx.clone(),
        spec,
        seed + 100,
        tx,
        will_rx,
    ));
    ready.push(rx);
    // Nothing is published before every persistent session holds its subscription.
    for r in ready {
        tokio::time::timeout(Duration::from_secs(30), r)
            .await
            .map_err(|_| anyhow::anyhow!("a persistent subscriber did not subscribe within 30 s"))?
            .map_err(|_| anyhow::anyhow!("a persistent subscriber gave up subscribing"))?;
    }
    let mut publishers = Vec::new();
    for (level, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        for k in 0..args.publishers_per_qos {
            let index = level as u32 * args.publishers_per_qos + k;
            let spec = PubSpec {
                index,
                qos,
                rate: args.rate,
                payload: args.payload,
            };
            let task = workers::publisher(ctx.clone(), spec, seed + 200 + u64::from(index));
            publishers.push(tokio::spawn(task));
        }
    }
    let will_clients = (0..args.will_clients)
        .map(|k| {
            tokio::spawn(workers::will_client(
                ctx.clone(),
                k,
                seed + 300 + u64::from(k),
            ))
        })
        .collect();
    let all_publishers = args.publishers_per_qos * 3;
    let churners = (0..args.churners)
        .map(|k| {
            let task = workers::churner(ctx.clone(), k, all_publishers, seed + 400 + u64::from(k));
            tokio::spawn(task)
        })
        .collect();
    let pairs = (0..args.takeover_pairs)
        .map(|k| {
            tokio::spawn(workers::takeover_pair(
                ctx.clone(),
                k,
                seed + 500 + u64::from(k),
            ))
        })
        .collect();
    Ok(Tasks {
        subscribers,
        will_watcher,
        publishers,
        will_clients,
        churners,
        pairs,
    })
}

/// SIGKILL, then the same binary, configuration, data and port; returns spawn → CONNACK ms.
async fn restart(setup: &mut Setup, ctx: &Ctx) -> anyhow::Result<f64> {
    ctx.up.store(false, Ordering::Relaxed);
    setup.broker.kill();
    setup.broker = Broker::spawn(setup.broker.spec.clone())?;
    let ready = setup
        .broker
        .wait_ready(&setup.subscriber, Duration::from_secs(60))
        .await?;
    ctx.epoch.fetch_add(1, Ordering::Relaxed);
    ctx.up.store(true, Ordering::Relaxed);
    Ok(ready.as_secs_f64() * 1000.0)
}

/// VmRSS and the number of open descriptors of the broker now.
fn sample(broker: &Broker, ctx: &Ctx, at: f64) -> Option<Sample> {
    let (rss_kib, _) = broker.memory_kib().ok()?;
    let fds = std::fs::read_dir(format!("/proc/{}/fd", broker.pid()))
        .ok()?
        .count() as u64;
    Some(Sample {
        at,
        rss_kib,
        fds,
        live: ctx.live.load(Ordering::Relaxed),
    })
}

/// Stops the clients, tells the persistent subscribers what they must have, lets them
/// drain, and counts what was published, acknowledged, delivered and lost.
async fn finish(
    tasks: Tasks,
    data_tx: &watch::Sender<Option<Expected>>,
    will_tx: &watch::Sender<Option<Expected>>,
    out: &mut Outcome,
    failures: &mut Vec<String>,
) {
    let mut pubs = Vec::new();
    for p in tasks.publishers {
        match p.await {
            Ok(p) => pubs.push(p),
            Err(e) => failures.push(format!("a publisher panicked: {e}")),
        }
    }
    let mut wills = Vec::new();
    for w in tasks.will_clients {
        match w.await {
            Ok(w) => wills.push(w),
            Err(e) => failures.push(format!("a will client panicked: {e}")),
        }
    }
    let mut churned = 0;
    for c in tasks.churners {
        churned += c.await.unwrap_or(0);
    }
    for p in tasks.pairs {
        let _ = p.await;
    }
    let expected: Vec<(u32, Vec<u64>)> = pubs
        .iter()
        .filter(|p| p.qos != QoS::AtMostOnce)
        .map(|p| (p.index, p.acked.clone()))
        .collect();
    let _ = data_tx.send(Some(Arc::new(expected)));
    let will_expected: Vec<(u32, Vec<u64>)> = wills
        .iter()
        .map(|w| (workers::WILL_BASE + w.index, w.expected.clone()))
        .collect();
    let _ = will_tx.send(Some(Arc::new(will_expected)));
    let mut subs = Vec::new();
    for s in tasks.subscribers {
        match s.await {
            Ok(s) => subs.push(s),
            Err(e) => failures.push(format!("a persistent subscriber panicked: {e}")),
        }
    }
    out.set("churner_messages", churned);
    deliveries(&pubs, &subs, out, failures);
    match tasks.will_watcher.await {
        Ok(w) => will_verdict(&wills, &w, out, failures),
        Err(e) => failures.push(format!("the will watcher panicked: {e}")),
    }
}

/// Published, acknowledged, delivered and lost per QoS level; a loss at QoS 1 or 2 fails.
fn deliveries(
    pubs: &[PubOutcome],
    subs: &[SubOutcome],
    out: &mut Outcome,
    failures: &mut Vec<String>,
) {
    let mut lost_samples = Vec::new();
    let mut lost_total = 0;
    for (level, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        let of_level: Vec<&PubOutcome> = pubs.iter().filter(|p| p.qos == qos).collect();
        let published: u64 = of_level.iter().map(|p| p.sent).sum();
        let acked: u64 = of_level.iter().map(|p| p.acked.len() as u64).sum();
        let (mut delivered, mut duplicates, mut lost) = (0, 0, 0);
        for s in subs {
            for p in &of_level {
                if let Some(t) = s.inbox.per_publisher.get(&p.index) {
                    delivered += t.distinct();
                    duplicates += t.duplicates();
                }
                if qos == QoS::AtMostOnce {
                    continue;
                }
                let (n, seqs) = verdict::missing(&s.inbox, p.index, &p.acked, 3);
                lost += n;
                for seq in seqs
                    .into_iter()
                    .take(8usize.saturating_sub(lost_samples.len()))
                {
                    lost_samples.push(format!("{}: publisher {} seq {seq}", s.id, p.index));
                }
            }
        }
        out.set(&format!("published_qos{level}"), published);
        if qos != QoS::AtMostOnce {
            out.set(&format!("acked_qos{level}"), acked);
            out.set(&format!("lost_qos{level}"), lost);
            lost_total += lost;
            if lost > 0 {
                failures.push(format!(
                    "{lost} acknowledged QoS {level} deliveries never reached a persistent subscriber"
                ));
            }
        }
        // Summed over the persistent subscribers: each should get every message.
        out.set(&format!("delivered_qos{level}"), delivered);
        out.set(&format!("duplicates_qos{level}"), duplicates);
    }
    out.set("persistent_subscribers", subs.len());
    out.set("lost", lost_total);
    out.set("lost_samples", lost_samples);
    let incomplete: Vec<&str> = subs
        .iter()
        .filter(|s| !s.complete)
        .map(|s| s.id.as_str())
        .collect();
    out.set(
        "drain_secs_max",
        round(subs.iter().map(|s| s.drain_secs).fold(0.0, f64::max), 1),
    );
    if !incomplete.is_empty() {
        out.set("drain_incomplete", incomplete.join(","));
    }
    let unstamped: u64 = subs.iter().map(|s| s.inbox.unstamped).sum();
    if unstamped > 0 {
        failures.push(format!("{unstamped} messages without a benchmark stamp"));
    }
}

/// Wills of abrupt ends must arrive; wills of DISCONNECTs must not.
fn will_verdict(
    wills: &[WillOutcome],
    watcher: &SubOutcome,
    out: &mut Outcome,
    failures: &mut Vec<String>,
) {
    let (mut expected, mut arrived, mut forbidden, mut wrongly, mut uncertain) = (0, 0, 0, 0, 0);
    for w in wills {
        let id = workers::WILL_BASE + w.index;
        expected += w.expected.len() as u64;
        arrived += verdict::wills_seen(&watcher.inbox, id, &w.expected);
        forbidden += w.forbidden.len() as u64;
        wrongly += verdict::wills_seen(&watcher.inbox, id, &w.forbidden);
        uncertain += w.uncertain;
    }
    out.set("wills_expected", expected);
    out.set("wills_delivered", arrived);
    out.set("wills_lost", expected - arrived);
    out.set("clean_disconnects_with_will", forbidden);
    out.set("wills_after_disconnect", wrongly);
    out.set("wills_uncertain", uncertain);
    if arrived < expected {
        failures.push(format!(
            "{} of {expected} wills never arrived",
            expected - arrived
        ));
    }
    if wrongly > 0 {
        failures.push(format!("{wrongly} wills published after a DISCONNECT"));
    }
}

/// RSS and descriptors: the reference level (after the post-restart warm-up) against the
/// end; growth beyond `max_growth` fails. Also a timeline, one sample a minute.
fn resources(
    out: &mut Outcome,
    failures: &mut Vec<String>,
    samples: &[Sample],
    total: Duration,
    restarted_at: Option<f64>,
    args: &SoakArgs,
) {
    let w = verdict::windows(total.as_secs_f64(), restarted_at);
    out.set(
        "reference_window_s",
        json!([round(w.reference.0, 0), round(w.reference.1, 0)]),
    );
    out.set(
        "end_window_s",
        json!([round(w.end.0, 0), round(w.end.1, 0)]),
    );
    let (Some(r), Some(e)) = (
        verdict::level(samples, w.reference.0, w.reference.1),
        verdict::level(samples, w.end.0, w.end.1),
    ) else {
        failures.push("no samples in the reference or the end window".into());
        return;
    };
    let rss_growth = verdict::growth(r.rss_kib, e.rss_kib);
    let fd_growth = verdict::growth(r.fds, e.fds);
    out.set("rss_mb_warmup", mb(r.rss_kib as u64));
    out.set("rss_mb_end", mb(e.rss_kib as u64));
    out.set("rss_growth", round(rss_growth, 4));
    out.set("fds_warmup", r.fds);
    out.set("fds_end", e.fds);
    out.set("fd_growth", round(fd_growth, 4));
    out.set("client_connections_warmup", r.live);
    out.set("client_connections_end", e.live);
    // Before the kill, for comparison (not judged): the first warm-up against the last minute.
    if let Some(restart) = restarted_at {
        let first = verdict::windows(total.as_secs_f64(), None);
        let span = first.reference.1 - first.reference.0;
        if let (Some(a), Some(b)) = (
            verdict::level(samples, first.reference.0, first.reference.1),
            verdict::level(samples, restart - span - 5.0, restart - 5.0),
        ) {
            out.set("rss_mb_first_warmup", mb(a.rss_kib as u64));
            out.set("rss_mb_before_kill", mb(b.rss_kib as u64));
            out.set("fds_first_warmup", a.fds);
            out.set("fds_before_kill", b.fds);
        }
    }
    let peak = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    out.set("rss_mb_max_sampled", mb(peak));
    let mut timeline = Vec::new();
    let mut next = 0.0;
    for s in samples {
        if s.at >= next {
            timeline.push(json!([round(s.at / 60.0, 1), mb(s.rss_kib), s.fds, s.live]));
            next += 60.0;
        }
    }
    out.set("timeline_min_rssmb_fds_clientconns", timeline);
    let limit = args.max_growth;
    if rss_growth > limit {
        failures.push(format!(
            "broker RSS grew {:.1}% from warm-up to the end (limit {:.0}%)",
            rss_growth * 100.0,
            limit * 100.0
        ));
    }
    if fd_growth > limit {
        failures.push(format!(
            "broker descriptors grew {:.1}% from warm-up to the end (limit {:.0}%)",
            fd_growth * 100.0,
            limit * 100.0
        ));
    }
    if out.fields.get("target").and_then(|t| t.as_str()) == Some(Kind::Mosquitto.name()) {
        out.set(
            "note",
            "Mosquitto writes its persistence file only at exit (autosave_interval 0): nothing survives SIGKILL",
        );
    }
}

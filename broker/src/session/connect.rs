//! A connection joins the session: the old one is closed (takeover), Clean Start
//! honoured, CONNACK answered with what the broker grants, and what the client is owed
//! sent again.

use super::attachment::{Attachment, TOPIC_ALIAS_MAX};
use super::close::Close;
use super::Session;
use crate::protocol::{ConnectCode, Outbound, Version};
use crate::routing::fanout;
use crate::shared::registry::Client;
use rumqttc::v5::mqttbytes::v5::ConnAckProperties;
use tokio::time::Duration;
use tracing::info;

impl Session {
    /// Takes a new connection: closes the current one (takeover), answers CONNACK,
    /// resends what is in flight and drains the queue. `is_new`: the session was
    /// created for this connection.
    pub(super) async fn attach(&mut self, client: Box<Client>, is_new: bool) {
        if self.conn.is_some() {
            self.close(Close::TakenOver).await;
        }
        let mut client = *client;
        let info = &client.info;
        if info.clean_start && !is_new {
            self.reset();
        }
        // A client back before its Will Delay ran out: no will (MQTT 5 §3.1.3.2.2).
        self.pending_will = None;
        let session_present = !is_new && !info.clean_start;
        let was_saved = self.expiry.is_persistent();
        self.expiry = info.session_expiry;
        self.expires_at = None;
        if was_saved || self.expiry.is_persistent() {
            self.became(self.expiry);
        }

        let max_keepalive = self.shared.config.session.max_keepalive_secs;
        let mut keep_alive = info.keep_alive;
        let mut server_keep_alive = None;
        if info.version == Version::V5 && max_keepalive > 0 && keep_alive > max_keepalive {
            keep_alive = max_keepalive;
            server_keep_alive = Some(max_keepalive);
        }
        let properties = (info.version == Version::V5).then(|| ConnAckProperties {
            session_expiry_interval: None,
            receive_max: Some(self.shared.config.session.receive_maximum),
            max_qos: None,
            retain_available: None,
            max_packet_size: Some(self.shared.config.listener.max_packet_size as u32),
            assigned_client_identifier: client.assigned_id.then(|| self.key.client_id.clone()),
            topic_alias_max: Some(TOPIC_ALIAS_MAX),
            reason_string: None,
            user_properties: Vec::new(),
            wildcard_subscription_available: None,
            subscription_identifiers_available: None,
            shared_subscription_available: None,
            server_keep_alive,
            response_information: info
                .request_response_info
                .then(|| format!("response/{}/{}", client.identity, self.key.client_id)),
            server_reference: None,
            authentication_method: None,
            authentication_data: None,
        });
        client.framed.max_out = info.max_packet_size;
        let _ = client.framed.queue(Outbound::ConnAck {
            session_present,
            code: ConnectCode::Accepted,
            properties,
        });
        self.shared.metrics.connections_total.inc();
        info!(
            identity = %client.identity,
            client_id = %self.key.client_id,
            addr = %client.addr,
            protocol = info.version.name(),
            clean_start = info.clean_start,
            session_present,
            keep_alive,
            "client connected"
        );
        let receive_max = info.receive_maximum;
        if let Some(l) = client.limits {
            self.outgoing
                .set_limits(l.max_inflight, l.max_queued, l.max_queued_bytes);
        }
        let keep_alive = (keep_alive > 0).then(|| Duration::from_secs(keep_alive.into()));
        self.conn = Some(Attachment::new(
            client,
            self.key.client_id.clone(),
            keep_alive,
            &self.shared.config.session,
        ));

        // Unacknowledged messages go again, in their original order, marked DUP.
        let resends = self.outgoing.attach(receive_max);
        self.resend(resends);
        self.flush().await;
        self.report_gauges(false);
    }

    /// Forgets all session state (Clean Start, or a session ended and begun again).
    pub(super) fn reset(&mut self) {
        self.unplace_all();
        self.drop_stored_queue();
        // Messages matched for the old subscriptions go with the old inbox; those the
        // store holds for this session are released. Closed first: a publisher still
        // waiting for room in it counts this session as ended.
        self.inbox.close();
        while let Ok(handed) = self.inbox.try_recv() {
            if handed.seq.is_some() {
                self.release(handed.delivery.envelope.id);
            }
        }
        // Sequence numbers go on from the old queue's: any record of it a crash leaves
        // behind is below the new mark, never taken for the new queue's.
        let next_seq = self.outbox.peek_seq().max(self.outgoing.next_seq());
        (self.outbox, self.inbox) = fanout::inbox(self.shared.config.session.inbox);
        self.outbox.set_next_seq(next_seq);
        self.outgoing.clear();
        self.outgoing.skip(next_seq.checked_sub(1));
        self.completed.clear();
        // The old mark is deleted: the next one is written, whatever it says.
        self.mark.low = u64::MAX;
        self.qos2_in.clear();
    }
}

//! Certificate lifecycle: revocation, hot reload, renewal, attempted for real.

use crate::common::*;
use broker::pki::{self, Authority, LeafSpec};
use rumqttc::mqttbytes::QoS;

#[tokio::test]
async fn revoked_certificate_is_refused_and_its_live_connection_closed() {
    let broker = TestBroker::start().await;
    let mut live = broker.client("subscriber", "soon-revoked").await;
    let mut publ = broker.client("publisher", "unaffected").await;

    let revoked = pki::revoke(&broker.pki.layout, "subscriber").unwrap();
    assert!(revoked.newly);
    live.expect_closed().await;
    wait_for_log(&[
        "WARN",
        "certificate was revoked",
        "identity=subscriber",
        "client_id=soon-revoked",
    ])
    .await;

    // Its next connection is refused at the handshake, naming the certificate.
    let mut again = broker.tls(Some(&broker.pki.client("subscriber"))).await;
    if let Ok(c) = &mut again {
        let _ = c.try_recv().await;
    }
    wait_for_log(&[
        "connection refused",
        "revoked certificate CN=subscriber",
        &revoked.serial,
    ])
    .await;

    publ.publish("articulos/x/futbol", b"still here", QoS::AtLeastOnce, false)
        .await;
    let mut fresh = broker.client("publisher", "new-after-revocation").await;
    fresh
        .publish("articulos/y/futbol", b"ok", QoS::AtLeastOnce, false)
        .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn replaced_broker_certificate_serves_new_connections_and_keeps_old_ones() {
    let broker = TestBroker::start().await;
    let mut live = broker.client("publisher", "long-lived").await;
    let before = live.server_serial();

    pki::renew_server(&broker.pki.layout).unwrap();
    let new_serial = pki::read_cert(&broker.pki.layout.server_cert)
        .unwrap()
        .raw_serial;
    assert_ne!(new_serial, before);
    let hex: String = new_serial.iter().map(|b| format!("{b:02x}")).collect();
    wait_for_log(&["TLS material reloaded", &hex]).await;

    live.publish(
        "articulos/a/futbol",
        b"same connection",
        QoS::AtLeastOnce,
        false,
    )
    .await;
    let fresh = broker.client("publisher", "after-swap").await;
    assert_eq!(fresh.server_serial(), new_serial);
    broker.shutdown().await;
}

#[tokio::test]
async fn invalid_key_file_is_refused_and_the_old_certificate_stays() {
    let broker = TestBroker::start().await;
    let first = broker.client("publisher", "first").await;
    let serial = first.server_serial();
    std::fs::write(&broker.pki.layout.server_key, b"not a key").unwrap();
    wait_for_log(&["ERROR", "TLS reload failed", "broker.key"]).await;
    let mut second = broker.client("publisher", "second").await;
    assert_eq!(second.server_serial(), serial);
    second
        .publish("articulos/a/futbol", b"served", QoS::AtLeastOnce, false)
        .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn broker_certificate_close_to_expiry_is_renewed_at_start() {
    let pki = TestPki::new();
    let ca = Authority::load(&pki.layout.ca_cert, &pki.layout.ca_key).unwrap();
    let short = ca
        .issue(&LeafSpec::server("broker", pki::server_sans(&[]), 10))
        .unwrap();
    std::fs::write(&pki.layout.server_cert, &short.cert_pem).unwrap();
    std::fs::write(&pki.layout.server_key, &short.key_pem).unwrap();
    let old = pki::read_cert(&pki.layout.server_cert).unwrap();
    assert!(old.days_left() <= 10);

    capture_logs();
    let handle = broker::start(pki.config()).await.unwrap();
    let renewed = pki::read_cert(&pki.layout.server_cert).unwrap();
    assert!(
        renewed.days_left() > 300,
        "not renewed: {} days left",
        renewed.days_left()
    );
    let mut c = TestClient::tls(
        handle.local_addr(),
        &pki.ca_pem(),
        Some(&pki.client("publisher")),
    )
    .await
    .unwrap();
    assert_eq!(
        c.server_serial(),
        renewed.raw_serial,
        "the renewed certificate is served"
    );
    c.connect("renewal", true, 30).await;
    wait_for_log(&["broker certificate was close to expiry: renewed"]).await;
    handle.shutdown().await;
}

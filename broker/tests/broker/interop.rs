//! Interop with the tools Mosquitto users have: mosquitto_pub, mosquitto_sub and
//! Python paho-mqtt, from Debian's packages. CI installs them; on a machine without
//! them these tests say so and pass, unless CI is set.

use crate::common::*;
use std::process::{Command, Output};

/// Whether `program args` runs (and, for a probe that must succeed, exits 0).
fn available(program: &str, args: &[&str], must_succeed: bool) -> bool {
    let ok = Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success() || !must_succeed);
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{program} is required in CI: apt-get install mosquitto-clients python3-paho-mqtt"
        );
        eprintln!("SKIPPED: {program} not installed (apt-get install mosquitto-clients python3-paho-mqtt)");
    }
    ok
}

async fn run(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn mosquitto(program: &str, broker: &TestBroker, identity: Option<&str>) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(["-h", "127.0.0.1", "-p", &broker.addr.port().to_string()])
        .arg("--cafile")
        .arg(&broker.pki.layout.ca_cert);
    if let Some(name) = identity {
        cmd.arg("--cert")
            .arg(broker.pki.layout.client_cert(name))
            .arg("--key")
            .arg(broker.pki.layout.client_key(name));
    }
    cmd
}

#[tokio::test]
async fn mosquitto_clients_exchange_a_message_and_are_refused_without_certificates() {
    if !available("mosquitto_pub", &["--help"], false)
        || !available("mosquitto_sub", &["--help"], false)
    {
        return;
    }
    let broker = TestBroker::start_with(|c| c.acl = shipped_acl()).await;
    for version in ["mqttv311", "mqttv5"] {
        let client_id = format!("sub-interop-{version}");
        let mut sub = mosquitto("mosquitto_sub", &broker, Some("subscriber"));
        sub.args([
            "-t",
            "articulos/eldiario/futbol",
            "-C",
            "1",
            "-W",
            "10",
            "-q",
            "1",
            "-V",
            version,
            "-i",
            &client_id,
        ]);
        let sub = tokio::task::spawn_blocking(move || sub.output().unwrap());
        wait_for_log(&["subscribed", &format!("client_id={client_id}")]).await;

        let mut publ = mosquitto("mosquitto_pub", &broker, Some("publisher"));
        publ.args([
            "-t",
            "articulos/eldiario/futbol",
            "-q",
            "1",
            "-V",
            version,
            "-m",
            "Título: Gol | Contenido: 1-0",
        ]);
        let out = run(publ).await;
        assert!(
            out.status.success(),
            "mosquitto_pub: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = sub.await.unwrap();
        assert!(
            out.status.success(),
            "mosquitto_sub: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "Título: Gol | Contenido: 1-0"
        );
    }

    let mut publ = mosquitto("mosquitto_pub", &broker, None);
    publ.args(["-t", "articulos/eldiario/futbol", "-m", "sin certificado"]);
    let out = run(publ).await;
    assert!(
        !out.status.success(),
        "mosquitto_pub without a certificate was accepted"
    );
    wait_for_log(&["connection refused", "no client certificate"]).await;

    let mut sub = mosquitto("mosquitto_sub", &broker, None);
    sub.args(["-t", "#", "-C", "1", "-W", "5"]);
    let out = run(sub).await;
    assert!(
        !out.status.success(),
        "mosquitto_sub without a certificate was accepted"
    );
    broker.shutdown().await;
}

const PAHO_SCRIPT: &str = r#"
import ssl, sys
import paho.mqtt.client as mqtt
host, port, ca, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
sub_cert, sub_key = sys.argv[6], sys.argv[7]
def make(client_id, certfile, keyfile):
    try:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION1, client_id=client_id)
    except AttributeError:
        c = mqtt.Client(client_id=client_id)
    c.tls_set(ca_certs=ca, certfile=certfile, keyfile=keyfile, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    return c
publisher = make("paho-pub", cert, key)
subscriber = make("paho-sub", sub_cert, sub_key)
result = {}
def on_connect(c, userdata, flags, rc):
    if rc != 0:
        print("refused", rc); sys.exit(3)
    c.subscribe("articulos/paho/futbol", qos=1)
def on_subscribe(c, userdata, mid, granted):
    if granted[0] == 128:
        print("subscription refused"); sys.exit(4)
    publisher.connect(host, port, keepalive=30)
    publisher.loop_start()
    publisher.publish("articulos/paho/futbol", "hola desde paho", qos=1)
def on_message(c, userdata, msg):
    result["payload"] = msg.payload.decode()
    c.disconnect()
subscriber.on_connect = on_connect
subscriber.on_subscribe = on_subscribe
subscriber.on_message = on_message
subscriber.connect(host, port, keepalive=30)
subscriber.loop_forever(timeout=1.0)
publisher.loop_stop()
print(result.get("payload", "NOTHING"))
"#;

#[tokio::test]
async fn paho_mqtt_publishes_and_receives_with_certificates() {
    let python = "/usr/bin/python3";
    if !available(python, &["-c", "import paho.mqtt.client"], true) {
        return;
    }
    let broker = TestBroker::start_with(|c| c.acl = shipped_acl()).await;
    let script = broker.pki.path("paho_interop.py");
    std::fs::write(&script, PAHO_SCRIPT).unwrap();
    let mut cmd = Command::new(python);
    cmd.arg(&script)
        .args(["127.0.0.1", &broker.addr.port().to_string()])
        .arg(&broker.pki.layout.ca_cert)
        .arg(broker.pki.layout.client_cert("publisher"))
        .arg(broker.pki.layout.client_key("publisher"))
        .arg(broker.pki.layout.client_cert("subscriber"))
        .arg(broker.pki.layout.client_key("subscriber"));
    let out = tokio::time::timeout(WAIT * 2, run(cmd))
        .await
        .expect("paho client hung");
    assert!(
        out.status.success(),
        "paho: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hola desde paho"
    );
    broker.shutdown().await;
}

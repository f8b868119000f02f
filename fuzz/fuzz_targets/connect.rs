//! A connection's first bytes, read as the edge reads them (`read_connect`) and
//! decided on by `admit` (client id, will topic, ACL), for one of a few identities and
//! ACLs picked by the first byte: never a panic, and an accepted CONNECT has a client
//! id and a will the identity may publish.
#![no_main]

use broker::acl::Acl;
use broker::fuzzing::Connect;
use broker::AclRule;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

#[path = "../reference.rs"]
mod reference;

const IDENTITIES: [&str; 4] = ["publisher", "subscriber", "sensor", "%c"];

fn acls() -> &'static [Acl; 3] {
    static ACLS: OnceLock<[Acl; 3]> = OnceLock::new();
    ACLS.get_or_init(|| {
        let rule = |identity: &str, publish: &[&str]| AclRule {
            identity: identity.into(),
            publish: publish.iter().map(|p| p.to_string()).collect(),
            subscribe: vec!["articulos/#".into()],
            ..Default::default()
        };
        [
            Acl::default(),
            Acl::new(vec![
                rule("publisher", &["articulos/#"]),
                rule("subscriber", &[]),
            ])
            .expect("valid rules"),
            Acl::new(vec![rule(
                "*",
                &["devices/%u/%c/#", "clientes/%c/estado", "+/x"],
            )])
            .expect("valid rules"),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, packet)) = data.split_first() else {
        return;
    };
    let identity = IDENTITIES[usize::from(pick & 3)];
    let acl = &acls()[usize::from(pick >> 2) % 3];
    if let Connect::Accepted {
        client_id,
        assigned_id,
        will_topic,
        ..
    } = broker::fuzzing::connect(packet, identity, acl)
    {
        assert!(!client_id.is_empty(), "accepted without a client id");
        assert!(!assigned_id || client_id.starts_with("auto-"));
        if let Some(topic) = will_topic {
            assert!(
                reference::valid_name(&topic),
                "will topic {topic:?} accepted"
            );
            assert!(!topic.starts_with('$'), "will topic {topic:?} accepted");
            assert!(acl.check_publish(identity, &client_id, &topic).allowed());
        }
    }
});

//! Who receives a published message: the index of plain subscriptions and the hand-over
//! into subscriber sessions' inboxes (`fanout`), rumqttd's router for `$share` groups
//! (`router`), and the retained messages a new subscription receives (`retained`).

pub(crate) mod fanout;
pub(crate) mod retained;
pub(crate) mod router;
